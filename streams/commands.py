"""``hytrec consume``: the Redis Streams consumer, one process, any number of them side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def consume(
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint directory (env HYTREC_MODEL).")] = None,
    partitions: Annotated[
        int | None, typer.Option("--partitions", help="Stream partitions (env HYTREC_STREAM_PARTITIONS).")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", help="Port of /metrics, 0: none (env HYTREC_CONSUME_METRICS_PORT).")
    ] = None,
    consumer_id: Annotated[str | None, typer.Option("--id", help="Consumer name (default host-pid-random).")] = None,
    until_idle: Annotated[
        bool, typer.Option("--until-idle", help="Exit once every partition held has nothing left to read.")
    ] = False,
) -> None:
    """Apply the event stream to the users' states, exactly once per entry, sharing partitions with peers.

    Stops on SIGTERM/SIGINT after acknowledging the batches in hand and releasing its leases; prints its
    totals as JSON on stdout at exit.
    """
    import asyncio
    import contextlib
    import logging
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from hytrec.model.serving import ServingModel
    from hytrec.service.commands import _set_env
    from hytrec.service.events import EventBatcher, EventIngestor
    from hytrec.service.online_eval import Attribution, attach
    from hytrec.service.runtime import settle_heap
    from hytrec.service.settings import Settings
    from hytrec.service.versions import MirrorSet
    from hytrec.state_store import open_store
    from hytrec.streams.consumer import Consumer

    _set_env("model", model)
    _set_env("stream_partitions", partitions)
    _set_env("consume_metrics_port", metrics_port)
    s = Settings()
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if s.consume_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(s.consume_metrics_port, addr=s.host)

    async def main() -> dict:
        import torch

        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hytrec-torch")
        loop = asyncio.get_running_loop()

        async def run(fn):  # noqa: ANN001, ANN202 - the service's runner: every torch call in one thread
            return await loop.run_in_executor(executor, fn)

        await run(lambda: torch.set_num_threads(s.torch_threads))
        serving = await run(lambda: ServingModel.load(s.model, s.state_dtype))
        settle_heap()  # a batch allocates many short-lived objects: keep the collector off the model's
        store = await open_store(s, serving.version, runner=run)
        batcher = EventBatcher(serving, store, s.events_batch_max_size, s.events_batch_max_wait_ms, s.max_queue)
        attribution = attach(s, store, batcher, serving.item_id)  # online evaluation of the streamed events
        batcher.start()
        ingestor = EventIngestor(  # event types as on the REST path (HYTREC_NEVER_AGAIN_TYPES, ..._COUNT_ONLY_TYPES)
            serving,
            batcher,
            s.strict_items,
            store=store,
            never_again=s.never_again,
            count_only=s.count_only,
            never_max=s.never_again_max,
        )
        consumer = Consumer(s, store, ingestor, consumer_id, until_idle=until_idle)

        def switched(head: EventIngestor) -> None:  # the online evaluation follows the consumed version
            head.batcher.on_applied = Attribution(attribution.impressions, head.model.item_id).observe

        # The versions written follow the desired versions, the consumed one included (docs/lifecycle.md).
        mirrors = MirrorSet(s, ingestor, store.client, run, consumer.id, consumer, switched)
        await mirrors.refresh()
        follow = asyncio.create_task(mirrors.follow())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, consumer.stop)
        try:
            totals = await consumer.run()
        finally:
            follow.cancel()
            with contextlib.suppress(BaseException):  # its subscription closes before the mirrors do
                await asyncio.wait_for(follow, 5)
            consumed, written = mirrors.primary.model.version, list(mirrors.written)
            await mirrors.close()
            await batcher.stop()
            await attribution.drain(timeout=2.0)
            await store.close()
            executor.shutdown(wait=False, cancel_futures=True)
        return {"consumer": consumer.id, "model_version": consumed, "write_versions": written} | totals.as_dict()

    try:  # cheaper per Redis round trip than the default loop
        import uvloop

        run_loop = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        run_loop = asyncio.run
    typer.echo(json.dumps(run_loop(main())))
