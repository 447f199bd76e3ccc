"""Security, against real servers: Redis AUTH + TLS, checkpoints that load only from safetensors and JSON,
erasure that leaves no key of a user in any model version, and the loopback bind by default."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import re
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import redis
from pydantic import SecretStr, ValidationError
from safetensors.torch import load_file, save_file

from hytrec.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, validate_checkpoint
from hytrec.state_store import StoreSettings, StoreUnavailable, open_store
from tests.helpers_model import make_model
from tests.redis_servers import free_port, wait_until
from tests.service_fixtures import REPO, Checkpoint, ServiceProcess, service_env

DEBIAN_REDIS = Path("/usr/bin/redis-server")
IN_CI = os.environ.get("CI", "").lower() == "true"
T0 = 1_700_000_000.0


# ------------------------------------------------------------------ Redis AUTH (ACL user) + TLS
def _need(what: str, present: bool) -> None:
    """Skip with the reason, except in CI where the tool must be there."""
    if not present:
        if IN_CI:
            pytest.fail(f"{what} is required in CI")
        pytest.skip(f"{what} is not installed")


def _redis7() -> bool:
    if not DEBIAN_REDIS.is_file():
        return False
    out = subprocess.run([str(DEBIAN_REDIS), "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"v=(\d+)\.", out)
    return bool(found and int(found.group(1)) >= 7)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_certificates(directory: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ca = ("-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=hytrec-test-ca")
    _openssl("req", "-x509", *ec, *ca, cwd=directory)
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=directory,
        )  # fmt: skip
    return {n: directory / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@dataclass
class TlsRedis:
    """A Debian redis-server 7 on a TLS-only loopback port, mutual TLS, the default user off, one ACL user."""

    port: int
    user: str
    password: str
    certs: dict[str, Path]
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def settings(self, **overrides: object) -> StoreSettings:
        values: dict[str, object] = {
            "redis_url": self.url,
            "redis_username": self.user,
            "redis_password": SecretStr(self.password),
            "redis_tls_ca_file": self.certs["ca.crt"],
            "redis_tls_cert_file": self.certs["client.crt"],
            "redis_tls_key_file": self.certs["client.key"],
            "key_prefix": f"t{uuid.uuid4().hex[:10]}",
            "redis_retries": 0,
            "connect_timeout_s": 2.0,
        }
        values.update(overrides)
        return StoreSettings(**values)

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            ssl=True,
            username=self.user,
            password=self.password,
            ssl_ca_certs=str(self.certs["ca.crt"]),
            ssl_certfile=str(self.certs["client.crt"]),
            ssl_keyfile=str(self.certs["client.key"]),
            socket_timeout=5,
        )


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    _need(f"{DEBIAN_REDIS} (redis-server >= 7)", _redis7())
    _need("the openssl command", shutil.which("openssl") is not None)
    directory = tmp_path_factory.mktemp("tls-redis")
    certs = make_certificates(directory)
    user, password = "hytrec-svc", secrets.token_urlsafe(16)
    (directory / "users.acl").write_text(f"user default off\nuser {user} on >{password} ~* &* +@all\n")
    port = free_port()
    args = [str(DEBIAN_REDIS), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
    args += ["--tls-cert-file", str(certs["server.crt"]), "--tls-key-file", str(certs["server.key"])]
    args += ["--tls-ca-cert-file", str(certs["ca.crt"]), "--tls-auth-clients", "yes"]
    args += ["--aclfile", str(directory / "users.acl"), "--dir", str(directory), "--logfile", "redis.log"]
    args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = TlsRedis(port, user, password, certs, proc)

    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError((directory / "redis.log").read_text(errors="replace")[-2000:])
        with server.client() as c:
            return bool(c.ping())

    try:
        wait_until(answers, what=f"TLS redis-server on {port}")
        yield server
    finally:
        proc.kill()
        proc.wait(10)


def test_store_works_over_tls_as_an_acl_user(tls_redis: TlsRedis) -> None:
    """The store's whole path (script load, CAS write, read, scan, erase) over rediss:// as the ACL user."""
    settings = tls_redis.settings()

    async def main() -> tuple[bytes | None, list[str], bool, str]:
        store = await open_store(settings, "v-tls")
        try:
            await store.put("alice", b"state-bytes", n_events=3, last_ts=T0)
            snap = await store.get("alice")
            users = [u async for u in store.scan_users()]
            info = await store.client.client_info()
            return snap.checked_blob() if snap else None, users, await store.delete_user("alice"), info["user"]
        finally:
            await store.close()

    blob, users, deleted, user = asyncio.run(main())
    assert (blob, users, deleted, user) == (b"state-bytes", ["alice"], True, tls_redis.user)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"redis_password": SecretStr("wrong")}, "invalid username-password"),
        ({"redis_username": None, "redis_password": None}, "authenticat"),  # the default user is off
        ({"redis_tls_ca_file": None}, "CERTIFICATE_VERIFY_FAILED"),  # the system CAs do not know the test CA
        ({"redis_tls_cert_file": None, "redis_tls_key_file": None}, ""),  # no client certificate: refused
    ],
)
def test_store_refuses_bad_credentials_and_unverified_servers(
    tls_redis: TlsRedis, overrides: dict[str, object], reason: str
) -> None:
    """Each wrong piece is a StoreUnavailable (the service answers 503 and retries), never a silent fallback."""
    with pytest.raises(StoreUnavailable, match=re.escape(reason) if reason else None) as caught:
        asyncio.run(open_store(tls_redis.settings(**overrides), "v-tls"))
    assert tls_redis.password not in str(caught.value)


def test_plain_connection_to_the_tls_port_fails(tls_redis: TlsRedis) -> None:
    settings = StoreSettings(redis_url=f"redis://127.0.0.1:{tls_redis.port}/0", redis_retries=0, socket_timeout_s=2)
    with pytest.raises(StoreUnavailable):
        asyncio.run(open_store(settings, "v-tls"))


def test_tls_files_without_rediss_are_a_settings_error(tls_redis: TlsRedis) -> None:
    with pytest.raises(ValidationError, match="rediss"):
        StoreSettings(redis_url="redis://127.0.0.1:6379/0", redis_tls_ca_file=tls_redis.certs["ca.crt"])
    with pytest.raises(ValidationError, match="go together"):
        StoreSettings(redis_url=tls_redis.url, redis_tls_cert_file=tls_redis.certs["client.crt"])


def test_service_end_to_end_over_tls_with_acl_user(
    tls_redis: TlsRedis, service_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    """`hytrec serve` configured by environment (password included) ingests and recommends over TLS; the
    password appears in no log line."""
    c = tls_redis.certs
    env = service_env(
        service_checkpoint,
        tls_redis.url,
        redis_username=tls_redis.user,
        redis_password=tls_redis.password,
        redis_tls_ca_file=c["ca.crt"],
        redis_tls_cert_file=c["client.crt"],
        redis_tls_key_file=c["client.key"],
        log_level="info",
    )
    serve = ServiceProcess(env, tmp_path).start()
    try:
        events = [{"user_id": "bob", "item_id": str(i), "ts": T0 + i, "event_id": f"b{i}"} for i in range(1, 11)]
        ack = httpx.post(serve.url + "/v1/events", json={"events": events}, timeout=30)
        assert ack.status_code == 200 and ack.json()["applied"] == 10, ack.text
        recs = httpx.get(serve.url + "/v1/users/bob/recommendations", params={"k": 5}, timeout=30)
        assert recs.status_code == 200 and recs.json()["history_length"] == 10, recs.text
        assert len(recs.json()["items"]) == 5 and recs.json()["fallback"] is False
        with tls_redis.client() as direct:  # the state really is on the TLS server, under the service's prefix
            keys = list(direct.scan_iter(match=f"{env['HYTREC_KEY_PREFIX']}:*{{u:bob}}*"))
        assert len(keys) >= 2, keys
    finally:
        serve.stop()
    assert tls_redis.password not in serve.output()


# ------------------------------------------------------------------ checkpoints: safetensors + JSON only
@pytest.fixture
def good_checkpoint(tmp_path: Path) -> Path:
    model = make_model()
    ids = [str(i) for i in range(model.cfg.n_items)]
    save_checkpoint(tmp_path / "ckpt", model, ids, [1] * len(ids))
    return tmp_path / "ckpt"


def _truncate(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])


def _tensors(ckpt: Path, edit) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def _config(ckpt: Path, text: str | bytes) -> None:
    (ckpt / "config.json").write_bytes(text.encode() if isinstance(text, str) else text)


def _edit_config(ckpt: Path, **changes: object) -> None:
    spec = json.loads((ckpt / "config.json").read_text())
    spec["config"].update(changes)
    _config(ckpt, json.dumps(spec))


BROKEN = {
    "truncated weights": (_truncate, r"model\.safetensors: not a complete safetensors file"),
    "empty weights": (lambda c: (c / "model.safetensors").write_bytes(b""), r"model\.safetensors: not a complete"),
    "wrong shape": (
        lambda c: _tensors(c, lambda t: t.update({"item_emb.weight": t["item_emb.weight"][:-1]})),
        r"model\.safetensors: .*tensor 'item_emb\.weight' is F32\[301, 64\], the config expects F32\[302, 64\]",
    ),
    "missing tensor": (
        lambda c: _tensors(c, lambda t: t.pop("item_emb.weight")),
        r"model\.safetensors: .*missing tensor 'item_emb\.weight'",
    ),
    "unexpected tensor": (
        lambda c: _tensors(c, lambda t: t.update({"extra.weight": t["item_emb.weight"][:2].clone()})),
        r"unexpected tensor 'extra\.weight'",
    ),
    "wrong dtype": (
        lambda c: _tensors(c, lambda t: t.update({"item_emb.weight": t["item_emb.weight"].half()})),
        r"tensor 'item_emb\.weight' is F16\[302, 64\]",
    ),
    "NaN weights": (
        lambda c: _tensors(c, lambda t: t["item_emb.weight"].__setitem__((3, 3), float("nan"))),
        r"tensor 'item_emb\.weight' holds NaN",
    ),
    "config not JSON": (lambda c: _config(c, '{"model_type": "hytrec", '), r"config\.json: malformed config"),
    "config not UTF-8": (lambda c: _config(c, b'{"model_type": "\xff"}'), r"config\.json: malformed config"),
    "config not an object": (lambda c: _config(c, "[1, 2]"), r"config\.json: malformed config"),
    "config without model_type": (lambda c: _config(c, '{"config": {}}'), r"config\.json: malformed config"),
    "unknown model_type": (
        lambda c: _config(c, json.dumps({"model_type": "gpt", "config": {"n_items": 300}})),
        r"config\.json: unknown model_type 'gpt'",
    ),
    "config field of the wrong type": (lambda c: _edit_config(c, d_model="64"), r"config\.json: malformed config"),
    "unknown config field": (lambda c: _edit_config(c, d_modell=64), r"config\.json: malformed config: unknown"),
    "config of another size": (lambda c: _edit_config(c, d_model=32), r"model\.safetensors: weights do not match"),
    "items file broken": (lambda c: (c / "items.json").write_text("{"), r"malformed items file"),
    "no weights, a pickle instead": (
        lambda c: (c / "model.safetensors").rename(c / "pytorch_model.bin"),
        r"has no model\.safetensors",
    ),
}


LOAD_ONLY = {"NaN weights"}  # the cheap check reads the header, not the values


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_is_a_clear_checkpoint_error(good_checkpoint: Path, case: str) -> None:
    """Every broken file gives CheckpointError naming the file (and the tensor), from the cheap check and from
    the load alike, and never anything else."""
    corrupt, message = BROKEN[case]
    validate_checkpoint(good_checkpoint)
    corrupt(good_checkpoint)
    if case not in LOAD_ONLY:
        with pytest.raises(CheckpointError, match=message):
            validate_checkpoint(good_checkpoint)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(good_checkpoint)


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_posing_as_safetensors_is_never_unpickled(good_checkpoint: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    (good_checkpoint / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="not a complete safetensors file"):
        load_checkpoint(good_checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["truncated weights", "wrong shape", "config not JSON"])
def test_serve_exits_with_the_checkpoint_error_not_a_traceback(good_checkpoint: Path, case: str) -> None:
    BROKEN[case][0](good_checkpoint)
    env = {**os.environ, "HYTREC_MODEL": str(good_checkpoint), "PYTHONPATH": str(REPO)}
    env["HYTREC_REDIS_URL"] = "redis://127.0.0.1:1/0"  # never reached: the check comes first
    out = subprocess.run(
        [sys.executable, "-m", "hytrec.cli", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert re.search(BROKEN[case][1], out.stderr) and out.stderr.startswith("error: "), out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout


# ------------------------------------------------------------------ erasure: no key left in any version
def _cluster_or_plain(url: str) -> redis.Redis | redis.RedisCluster:
    if url.startswith("redis+cluster://"):
        return redis.RedisCluster.from_url("redis://" + url[len("redis+cluster://") :])
    return redis.Redis.from_url(url)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _keys_of(client: redis.Redis | redis.RedisCluster, prefix: str, user: str) -> list[bytes]:
    """Every key of ``user`` under ``prefix``, whatever its kind or model version: SCAN over every primary."""
    return sorted(client.scan_iter(match=f"{_glob_escape(prefix)}:*{{u:{_glob_escape(user)}}}*", count=1000))


@pytest.mark.parametrize("user", ["erase-me", "a*b?[c]\\d:é"])
def test_store_erasure_scans_clean_in_every_version(redis_url: str, user: str) -> None:
    """Three model versions, state + dedup ids in each: after delete_user, SCAN finds no key of the user on
    any primary; another user's keys are all still there."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    versions = ["v-old", "v-mid", "v-new"]

    async def main() -> None:
        for mv in versions:
            store = await open_store(StoreSettings(redis_url=redis_url, key_prefix=prefix), mv)
            try:
                for who in (user, "keeper"):
                    await store.update_many([who], lambda snaps, mv=mv: _writes(snaps, mv))
            finally:
                await store.close()
        store = await open_store(StoreSettings(redis_url=redis_url, key_prefix=prefix), versions[-1])
        try:
            assert await store.delete_user(user) is True
        finally:
            await store.close()

    with _cluster_or_plain(redis_url) as client:
        try:
            asyncio.run(main())
            assert _keys_of(client, prefix, user) == []
            assert len(_keys_of(client, prefix, "keeper")) == 2 * len(versions) + 1  # :s, :d each, one :v
        finally:
            for key in client.scan_iter(match=f"{prefix}:*"):
                client.delete(key)


def _writes(snaps: dict, mv: str) -> dict:
    from hytrec.state_store import Write

    return {u: Write(f"{mv}-blob".encode(), (f"{u}-{mv}-e1", f"{u}-{mv}-e2"), last_ts=T0) for u in snaps}


def test_http_delete_leaves_no_key_of_the_user(
    service_checkpoint: Checkpoint, redis_standalone_url: str, tmp_path: Path
) -> None:
    """Written through the service (its model version) and by a store of another model version on the same
    prefix, `DELETE /v1/users/{id}` leaves SCAN nothing of the user; the other user is untouched."""
    env = service_env(service_checkpoint, redis_standalone_url)
    prefix = env["HYTREC_KEY_PREFIX"]
    user, other = "erase:me@1", "keeper"

    async def other_version() -> None:
        store = await open_store(StoreSettings(redis_url=redis_standalone_url, key_prefix=prefix), "v-previous")
        try:
            for who in (user, other):
                await store.update_many([who], lambda snaps: _writes(snaps, "v-previous"))
        finally:
            await store.close()

    serve = ServiceProcess(env, tmp_path).start()
    with redis.Redis.from_url(redis_standalone_url) as client:
        try:
            asyncio.run(other_version())
            for who in (user, other):
                events = [{"user_id": who, "item_id": str(i), "ts": T0 + i, "event_id": f"{who}-{i}"} for i in (1, 2)]
                assert httpx.post(serve.url + "/v1/events", json={"events": events}, timeout=30).status_code == 200
            before = _keys_of(client, prefix, user)
            assert len(before) == 5, before  # :s and :d in two versions, the version set
            answer = httpx.delete(serve.url + f"/v1/users/{user}", timeout=30)
            assert answer.status_code == 200 and answer.json() == {"user_id": user, "deleted": True}, answer.text
            assert _keys_of(client, prefix, user) == []
            assert len(_keys_of(client, prefix, other)) == 5
            assert httpx.get(serve.url + f"/v1/users/{user}", timeout=30).status_code == 404
        finally:
            serve.stop()
            for key in client.scan_iter(match=f"{prefix}:*"):
                client.delete(key)


# ------------------------------------------------------------------ the loopback bind by default
def _non_loopback_ipv4() -> list[str]:
    return [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family.name == "AF_INET" and not a.address.startswith("127.")
    ]


def test_serve_binds_loopback_by_default(
    service_checkpoint: Checkpoint, redis_standalone_url: str, tmp_path: Path
) -> None:
    """No HYTREC_HOST: the listening socket is 127.0.0.1, and the port is closed on the machine's other
    addresses (when it has any)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "HYTREC_HOST"}
    env.update(service_env(service_checkpoint, redis_standalone_url), HYTREC_PORT=str(port), PYTHONPATH=str(REPO))
    env.setdefault("HYTREC_LOG_LEVEL", "warning")
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hytrec.cli", "serve"], cwd=REPO, env=env, stdout=log, stderr=log
        )
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        wait_until(lambda: proc.poll() is None and httpx.get(url, timeout=1).status_code == 200, 90, "serve")
        listening = [
            c.laddr for c in psutil.Process(proc.pid).net_connections("inet") if c.status == psutil.CONN_LISTEN
        ]
        assert listening and all(addr.ip == "127.0.0.1" and addr.port == port for addr in listening), listening
        for address in _non_loopback_ipv4():
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{address}:{port}/healthz", timeout=2)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
