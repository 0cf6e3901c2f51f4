"""alignlab.cache: build once then load, keys, corrupt files, ALIGNLAB_CACHE, a two-process race, modules."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from alignlab import cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLAB_CACHE", str(tmp_path / "cache"))
    cache.clear_memory()
    yield tmp_path / "cache"
    cache.clear_memory()


def counting_build(value):
    calls = []

    def build():
        calls.append(1)
        return {"w": torch.tensor(value), "name": "x", "n": len(calls)}

    return build, calls


def code_a():
    return 1


def code_b():
    return 2


# ----------------------------------------------------------------------------- location and keys

def test_cache_dir_follows_env(cache_dir, monkeypatch):
    assert cache.cache_dir() == cache_dir
    assert cache.path_for("thing", {"a": 1}).parent == cache_dir
    monkeypatch.delenv("ALIGNLAB_CACHE")
    assert cache.cache_dir() == Path.home() / ".cache" / "alignlab"


def test_key_depends_on_name_config_and_code():
    k = cache.key("model", {"steps": 10, "lr": 1e-3})
    assert k.startswith("model-") and len(k) == len("model-") + 16
    assert cache.key("model", {"lr": 1e-3, "steps": 10}) == k         # dict order does not matter
    assert cache.key("model", {"steps": 11, "lr": 1e-3}) != k          # config does
    assert cache.key("other", {"steps": 10, "lr": 1e-3}) != k          # name does
    ka, kb = (cache.key("model", {"steps": 10}, code=(f,)) for f in (code_a, code_b))
    assert ka != kb != cache.key("model", {"steps": 10})                # the code objects do
    assert cache.key("model", {"steps": 10}, code=(code_a,)) == ka      # deterministic
    assert cache.path_for("model", {"steps": 10}, code=(code_a,)).name == ka + ".pt"


def test_code_version_hashes_source_and_version(monkeypatch):
    v = cache.code_version(code_a, cache)
    assert len(v) == 12 and v == cache.code_version(code_a, cache)
    assert v != cache.code_version(code_b, cache) != cache.code_version()
    monkeypatch.setattr(cache, "__version__", "9.9.9")  # a new release invalidates everything
    assert cache.code_version(code_a, cache) != v


@pytest.mark.parametrize("bad", ["a b", "../x", "a/b", "", "x.pt"])
def test_key_rejects_bad_names(bad):
    with pytest.raises(ValueError, match="letters, digits"):
        cache.key(bad, {})


# ----------------------------------------------------------------------------- load_or_build

def test_builds_once_then_loads(cache_dir):
    build, calls = counting_build(1.5)
    first = cache.load_or_build("thing", {"a": 1}, build)
    assert calls == [1] and first["n"] == 1
    assert cache.load_or_build("thing", {"a": 1}, build) is first       # in-memory copy
    cache.clear_memory()
    again = cache.load_or_build("thing", {"a": 1}, build)              # from disk
    assert calls == [1] and again is not first
    assert torch.equal(again["w"], torch.tensor(1.5)) and again["name"] == "x"
    cache.load_or_build("thing", {"a": 2}, build)                      # another config: built
    cache.load_or_build("thing", {"a": 1}, build, code=(code_a,))      # other code: built
    assert len(calls) == 3
    assert sorted(p.suffix for p in cache_dir.iterdir() if p.suffix != ".lock") == [".pt"] * 3


def test_corrupt_file_is_rebuilt_with_a_warning(cache_dir):
    path = cache.path_for("thing", {"a": 1})
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage, not a torch file\xff" * 10)
    build, calls = counting_build(2.0)
    with pytest.warns(UserWarning, match="(?s)unreadable.*rebuilding"):
        obj = cache.load_or_build("thing", {"a": 1}, build)
    assert calls == [1] and torch.equal(obj["w"], torch.tensor(2.0))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.tensor(2.0))  # replaced by a good file
    path.write_bytes(path.read_bytes()[:20])  # truncated
    cache.clear_memory()
    with pytest.warns(UserWarning, match="unreadable"):
        cache.load_or_build("thing", {"a": 1}, build)
    assert len(calls) == 2
    assert not list(cache_dir.glob("*.tmp*"))  # no temporary files left behind


def test_cache_dir_is_created_and_env_respected(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "er"
    monkeypatch.setenv("ALIGNLAB_CACHE", str(target))
    cache.clear_memory()
    try:
        build, _ = counting_build(0.0)
        cache.load_or_build("thing", {}, build)
        assert [p.suffix for p in target.iterdir() if p.suffix != ".lock"] == [".pt"]
    finally:
        cache.clear_memory()


def test_arbitrary_pickles_are_not_loaded(cache_dir):
    """Loads use weights_only=True: a file holding an arbitrary object is refused and rebuilt, never unpickled."""
    path = cache.path_for("obj", {})
    path.parent.mkdir(parents=True)
    torch.save({"x": NotPlainData()}, path)
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.load_or_build("obj", {}, lambda: {"x": "plain"}) == {"x": "plain"}


class NotPlainData:
    pass


RACE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from alignlab import cache

    counter, me, other = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    me.touch()
    deadline = time.time() + 60
    while not other.exists() and time.time() < deadline:  # start both builds together
        time.sleep(0.01)

    def build():
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        return {"pid": os.getpid()}

    print(cache.load_or_build("race", {"k": 1}, build)["pid"])
""")


def test_two_processes_build_only_once(cache_dir, tmp_path):
    counter = tmp_path / "builds.txt"
    env = {**os.environ, "ALIGNLAB_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    procs = [subprocess.Popen([sys.executable, "-c", RACE_SCRIPT, str(counter), str(ready[i]), str(ready[1 - i])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    builders = counter.read_text().split()
    assert len(builders) == 1, builders
    assert [out.strip() for out, _ in outs] == builders * 2  # the loser loaded the winner's artifact


# ----------------------------------------------------------------------------- cached_module

def test_cached_module_round_trip(cache_dir):
    trained = []

    def make():
        return torch.nn.Linear(3, 2)

    def train(m):
        trained.append(1)
        with torch.no_grad():
            m.weight.copy_(torch.arange(6.0).view(2, 3))
            m.bias.fill_(-1.0)
        m.train()

    net = cache.cached_module("lin", {"v": 1}, make, train)
    assert trained == [1] and not net.training
    assert torch.equal(net.weight, torch.arange(6.0).view(2, 3)) and torch.equal(net.bias, torch.tensor([-1.0, -1.0]))
    x = torch.randn(4, 3)
    cache.clear_memory()
    net2 = cache.cached_module("lin", {"v": 1}, make, lambda m: pytest.fail("must not retrain"), device="cpu")
    assert net2 is not net and not net2.training and net2.weight.device.type == "cpu"
    torch.testing.assert_close(net2(x), x @ torch.arange(6.0).view(2, 3).T - 1.0)


def test_build_is_seeded_and_leaves_the_callers_rng_alone(tmp_path, monkeypatch):
    """A cache miss must not change what the caller draws next, and the artifact must not depend on the
    caller's RNG state (otherwise a notebook's results would depend on whether the cache was warm)."""
    monkeypatch.setenv("ALIGNLAB_CACHE", str(tmp_path))
    cache.clear_memory()

    def make():
        return torch.nn.Linear(3, 2)

    torch.manual_seed(1)
    a = cache.cached_module("seeded_a", {"k": 1}, make, lambda m: None, seed=7)
    after_miss = torch.rand(3)
    torch.manual_seed(1)
    expected = torch.rand(3)
    assert torch.equal(after_miss, expected)

    torch.manual_seed(999)  # a different caller state, same seed: same weights
    b = cache.cached_module("seeded_b", {"k": 1}, make, lambda m: None, seed=7)
    assert torch.equal(a.weight, b.weight)
    c = cache.cached_module("seeded_c", {"k": 1}, make, lambda m: None, seed=8)
    assert not torch.equal(a.weight, c.weight)
    cache.clear_memory()


def test_base_model_keys_follow_their_builders_source(monkeypatch):
    """Editing a builder (its preset or its make/fit) must retrain: each builder's source is in its cache key."""
    from alignlab.guidance import base

    seen = {}

    def fake(name, config, make, train, *, code=(), device="cpu", seed=None):
        seen[name] = code
        raise RuntimeError("stop")

    monkeypatch.setattr(cache, "cached_module", fake)
    for builder in (base.digits_denoiser, base.ring_flow, base.mnist1d_denoiser):
        with pytest.raises(RuntimeError):
            builder("quick")
    assert base.digits_denoiser in seen["digits_denoiser"] and base.ring_flow in seen["ring_flow"]
    assert base.mnist1d_denoiser in seen["mnist1d_denoiser"]
