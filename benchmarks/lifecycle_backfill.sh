#!/bin/bash
# ML-1M backfill speed (docs/lifecycle.md): fill a stream with the whole data set on a Redis of its own, then
# time `hytrec backfill --from-stream` and `hytrec backfill --history` on it. Usage: benchmarks/lifecycle_backfill.sh
set -e
cd "$(dirname "$0")/.."
WORK=$(mktemp -d /tmp/hytrec-backfill-bench.XXXX)
BIN=$(.venv/bin/python -c "from tests.redis_servers import REDIS_SERVER; print(REDIS_SERVER)")
PORT=$(.venv/bin/python -c "from tests.redis_servers import free_port; print(free_port())")
$BIN --port $PORT --save '' --appendonly no --dir $WORK --daemonize yes --pidfile $WORK/redis.pid
sleep 1
export HYTREC_REDIS_URL=redis://127.0.0.1:$PORT HYTREC_KEY_PREFIX=bench HYTREC_STREAM_PARTITIONS=4 HYTREC_STREAM_MAXLEN=0
.venv/bin/python - <<'PY'
import time
from hytrec.eventlog import read_events
from hytrec.streams import StreamProducer
u, i, t = read_events("../shared/data/ml-1m/interactions.tsv.gz")
import numpy as np
order = np.argsort(t, kind="stable")
start = time.perf_counter()
with StreamProducer.from_settings() as p:
    for lo in range(0, len(order), 10000):
        idx = order[lo:lo+10000]
        p.add([{"user_id": str(u[k]), "item_id": str(i[k]), "ts": float(t[k])} for k in idx])
print(f"produced {len(order)} events in {time.perf_counter()-start:.1f}s")
PY
echo "--from-stream"; /usr/bin/time -v .venv/bin/hytrec backfill --from-stream --model models/ml1m-hytrec 2>$WORK/time1.txt; grep -E "Maximum resident|Elapsed" $WORK/time1.txt
echo "--history"; /usr/bin/time -v .venv/bin/hytrec backfill --history ../shared/data/ml-1m/interactions.tsv.gz --model models/ml1m-hytrec 2>$WORK/time2.txt; grep -E "Maximum resident|Elapsed" $WORK/time2.txt
kill $(cat $WORK/redis.pid)
