"""Object-store faults injected around the real loopback Swift by a proxy on
127.0.0.1: connection resets, 5xx, slow answers and hangs are retried within
limits and end either in a complete, verified image or in a resumable
failure that a re-run finishes without re-sending finished segments."""
from __future__ import annotations

import hashlib
import os
import urllib.parse

import pytest

import vhdcore.imaging as imaging
from _faultproxy import FaultProxy, Rule
from _swift import CountingStore, require_swift, swift_connection, unique
from vhdcore._workloads import make_chain
from vhdcore.chain import Chain
from vhdcore.errors import StoreError, UploadError
from vhdcore.imaging import create_image, job_state_path
from vhdcore.store import RetryPolicy, open_store, restore

MiB = 1024 * 1024
FAST_RETRY = RetryPolicy(attempts=4, initial_delay=0.05, max_delay=0.2, deadline=30)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return make_chain(tmp_path_factory.mktemp("c"), "realistic", size=32 * MiB, layers=2, seed=4,
                      block_size=512 * 1024)


@pytest.fixture
def proxy():
    require_swift()
    up = urllib.parse.urlparse(os.environ["ST_AUTH"])
    p = FaultProxy(f"http://{up.netloc}").start()
    yield p
    p.stop()


def _digest(path) -> str:
    h = hashlib.sha256()
    with Chain.open(path) as c:
        for v in c.iter_raw(8 * MiB):
            h.update(v)
    return h.hexdigest()


def _target(proxy, tmp_path):
    c = unique("faults")
    swift_connection().put_container(c)
    return f"swift://{c}/img"


def _opts(proxy, timeout=10.0):
    return {"auth_url": proxy.auth_url, "user": os.environ["ST_USER"], "key": os.environ["ST_KEY"],
            "retry": FAST_RETRY, "timeout": timeout}


def _verify(url, tmp_path, chain):
    out = tmp_path / "restored.vhd"
    restore(url, out)
    assert _digest(out) == _digest(chain.leaf)


@pytest.mark.parametrize("rule", [
    Rule("status", method="PUT", path_contains="_segments", status=503, times=3, every=2),
    Rule("status", method="PUT", path_contains="_segments", status=500, times=2),
    Rule("reset", method="PUT", path_contains="_segments", times=2, every=2),
    Rule("slow", method="PUT", delay=0.4, times=3),
    Rule("hang", method="PUT", path_contains="_segments", delay=3.0, times=1),
    Rule("status", method="PUT", path_contains="multipart-manifest", status=503, times=1),
], ids=["503", "500", "reset", "slow", "timeout", "manifest-503"])
def test_transient_faults_are_retried(chain, tmp_path, proxy, rule):
    proxy.rules = [rule]
    url = _target(proxy, tmp_path)
    res = create_image(chain.leaf, url, segment_size=5 * MiB, state_dir=tmp_path,
                       store_options=_opts(proxy, timeout=1.5))
    assert rule.fired >= 1, "the fault was never injected"
    assert res.segments >= 2
    _verify(url, tmp_path, chain)


def test_persistent_failure_is_resumable(chain, tmp_path, proxy, monkeypatch):
    url = _target(proxy, tmp_path)
    # after two segments the server fails every segment PUT: retries run out
    proxy.rules = [Rule("status", method="PUT", path_contains="_segments", status=503, times=-1)]
    proxy.rules[0].seen = 0
    ok_first = Rule("slow", method="PUT", path_contains="_segments", delay=0.0, times=2)
    proxy.rules.insert(0, ok_first)
    stores = []
    real = imaging.open_store

    def counting(u, **kw):
        s = CountingStore(real(u, **kw))
        stores.append(s)
        return s

    monkeypatch.setattr(imaging, "open_store", counting)
    with pytest.raises(UploadError):
        create_image(chain.leaf, url, segment_size=5 * MiB, state_dir=tmp_path, concurrency=1,
                     store_options=_opts(proxy))
    assert os.path.exists(job_state_path(url, tmp_path))
    with pytest.raises(StoreError):
        open_store(url, **_opts(proxy)).get_manifest()  # no manifest claims completion
    import json

    state = json.loads(open(job_state_path(url, tmp_path)).read())
    done_first = {int(k) for k in state["segments"]}
    assert done_first, "no segment finished before the failure"
    proxy.rules = []  # the server recovers
    res = create_image(chain.leaf, url, segment_size=5 * MiB, state_dir=tmp_path, resume=True,
                       store_options=_opts(proxy))
    assert res.resumed
    assert not done_first & set(stores[1].puts), "finished segments were sent again"
    _verify(url, tmp_path, chain)


def test_wrong_credentials_fail_fast(chain, tmp_path, proxy):
    from vhdcore.errors import StoreAuthError
    import time

    url = _target(proxy, tmp_path)
    opts = _opts(proxy)
    opts["key"] = "wrong"
    t = time.monotonic()
    with pytest.raises(StoreAuthError):
        create_image(chain.leaf, url, state_dir=tmp_path, store_options=opts)
    assert time.monotonic() - t < 10
