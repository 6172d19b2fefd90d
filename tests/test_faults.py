"""Injected faults: an exception (or Ctrl-C) anywhere in attach, load, detach or save leaves the
model and the previous checkpoint as they were. test_errors.py covers refusals of bad input."""

from __future__ import annotations

import os

import pytest
import torch

import lora_lite as ll
import lora_lite.checkpoint as ckpt
import lora_lite.runtime as runtime
from lora_lite.variant import REGISTRY, Variant

from cases import CASES, PRIMARY, variant
from conftest import assert_untouched, make_qwen, snapshot

N_TARGETS = 14  # 7 linear layers in each of the tiny Qwen3's 2 blocks
WHERE = {"first": 1, "middle": N_TARGETS // 2, "last": N_TARGETS}


@pytest.fixture(scope="module")
def qwen_bench():
    return make_qwen()


@pytest.fixture()
def model(qwen_bench):
    return qwen_bench.fresh()


def fail_on_call(n, exc=RuntimeError("injected fault")):
    """A wrapper factory: the wrapped function raises `exc` on its n-th call."""
    calls = []

    def wrap(fn):
        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise exc
            return fn(*args, **kwargs)

        return wrapper

    wrap.calls = calls
    return wrap


def _untouched_after(model, exc_type, call):
    before = snapshot(model)
    modes = [m.training for m in model.modules()]
    with pytest.raises(exc_type):
        call()
    assert_untouched(model, before)
    assert [m.training for m in model.modules()] == modes


# ------------------------------------------------------------------------------------- attach
# the primary case of every variant with its own init (one with calibration data and one
# without in the fast tier, the others in the full tier)
_INITS = [c for c in PRIMARY if variant(c).init is not Variant.init]
_FAST = {next(c for c in _INITS if variant(c).calibration_needs(CASES[c](()))[1] is need) for need in (True, False)}


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c in _FAST else pytest.mark.slow) for c in _INITS])
def test_variant_init_fails_at_a_target(model, qwen_bench, monkeypatch, case, where):
    cls = variant(case)
    wrap = fail_on_call(WHERE[where])
    monkeypatch.setattr(cls, "init", staticmethod(wrap(cls.init)))
    cfg = CASES[case](())
    data = qwen_bench.calibration if cls.calibration_needs(cfg)[0] else None
    _untouched_after(model, RuntimeError, lambda: ll.attach(model, cfg, calibration_data=data, progress=False))
    assert len(wrap.calls) == WHERE[where]


@pytest.mark.parametrize("where", WHERE)
def test_paramspec_init_fails_at_a_target(model, monkeypatch, where):
    """LoRA has two ParamSpecs per target: fail on the first tensor of the chosen target."""
    wrap = fail_on_call(2 * WHERE[where] - 1)
    monkeypatch.setattr(runtime, "init_tensor", wrap(runtime.init_tensor))
    _untouched_after(model, RuntimeError, lambda: ll.attach(model, ll.LoRAConfig(r=4)))


@pytest.mark.parametrize("variant", ["eva", "antipasto_corda"])
def test_keyboard_interrupt_during_calibration(model, qwen_bench, variant):
    def batches():
        yield from qwen_bench.calibration[:2]
        raise KeyboardInterrupt

    cfg = ll.AdapterConfig.from_dict({"variant": variant, "r": 4})
    model.train()  # the calibration pass switches to eval; the mode must come back
    _untouched_after(model, KeyboardInterrupt, lambda: ll.attach(model, cfg, calibration_data=batches(), progress=False))


def test_keyboard_interrupt_while_adding_hooks(model, monkeypatch):
    """The last step of attach: tensors exist, flags are frozen, some hooks are registered."""
    monkeypatch.setattr(runtime, "_add_hook", fail_on_call(WHERE["last"], KeyboardInterrupt())(runtime._add_hook))
    _untouched_after(model, KeyboardInterrupt, lambda: ll.attach(model, ll.LoRAConfig(r=4)))


# ------------------------------------------------------------------------------------- load
@pytest.fixture()
def checkpoint(qwen_bench, tmp_path):
    m = qwen_bench.fresh()
    ll.attach(m, ll.DoRAConfig(r=4))
    path = tmp_path / "a.safetensors"
    ll.save(m, path)
    return path


@pytest.mark.parametrize("step", ["_create", "_add_hook"])
@pytest.mark.parametrize("where", WHERE)
def test_load_interrupted(model, checkpoint, monkeypatch, step, where):
    """Ctrl-C while load installs (creating tensors, or adding hooks after the freeze)."""
    n = WHERE[where] * (3 if step == "_create" else 1)  # DoRA creates 3 tensors per target
    monkeypatch.setattr(runtime, step, fail_on_call(n, KeyboardInterrupt())(getattr(runtime, step)))
    _untouched_after(model, KeyboardInterrupt, lambda: ll.load(model, checkpoint))


@pytest.mark.parametrize("variant", ["lora", "pissa"])
def test_interrupted_detach_can_be_retried(model, qwen_bench, monkeypatch, variant):
    """detach interrupted half-way (some targets' tensors already deleted): calling detach again
    finishes the job and gives the pristine base back, bit for bit."""
    before = snapshot(model)
    ll.attach(model, ll.AdapterConfig.from_dict({"variant": variant, "r": 4}))
    with monkeypatch.context() as mp:
        mp.setattr(runtime, "_delete", fail_on_call(WHERE["middle"], KeyboardInterrupt())(runtime._delete))
        with pytest.raises(KeyboardInterrupt):
            ll.detach(model)
    ll.detach(model)
    assert_untouched(model, before)


# ------------------------------------------------------------------------------------- save
@pytest.fixture()
def attached(qwen_bench):
    m = qwen_bench.fresh()
    ll.attach(m, ll.LoRAConfig(r=4))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.01)
    return m


def _partial_write(tmp, data):
    with open(tmp, "wb") as f:
        f.write(data[:100])
    raise OSError(28, "No space left on device")


SAVE_FAULTS = {
    "serialize": (ckpt, "serialize", lambda real: fail_on_call(1, KeyboardInterrupt())(real), KeyboardInterrupt),
    "write": (ckpt, "_write_new", lambda real: _partial_write, OSError),
    "fsync": (os, "fsync", lambda real: fail_on_call(1, OSError(5, "Input/output error"))(real), OSError),
    "rename": (os, "replace", lambda real: fail_on_call(1, OSError(18, "Invalid cross-device link"))(real), OSError),
}


@pytest.mark.parametrize("fault", SAVE_FAULTS)
def test_failed_save_keeps_the_previous_file(attached, tmp_path, monkeypatch, fault):
    path = tmp_path / "adapter.safetensors"
    ll.save(attached, path)
    previous = path.read_bytes()
    with torch.no_grad():
        next(p for p in attached.parameters() if p.requires_grad).add_(1.0)  # the next save differs
    module, name, make, exc = SAVE_FAULTS[fault]
    with monkeypatch.context() as mp:
        mp.setattr(module, name, make(getattr(module, name)))
        with pytest.raises(exc):
            ll.save(attached, path)
    assert path.read_bytes() == previous
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors"]  # no temp file left
    ll.save(attached, path)  # and nothing is stuck: the next save works
    assert path.read_bytes() != previous


def test_failed_first_save_leaves_no_file(attached, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", fail_on_call(1, OSError(18, "Invalid cross-device link"))(os.replace))
    with pytest.raises(OSError):
        ll.save(attached, tmp_path / "adapter.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("relative", [False, True])
def test_save_into_a_missing_folder_names_the_given_path(attached, tmp_path, monkeypatch, relative):
    monkeypatch.chdir(tmp_path)
    given = os.path.join("no_such_dir", "adapter.safetensors")
    path = given if relative else str(tmp_path / given)
    with pytest.raises(FileNotFoundError) as info:
        ll.save(attached, path)
    assert info.value.filename == path
    assert repr(path) in str(info.value) and ".tmp" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_saved_file_gets_the_usual_permissions(attached, tmp_path):
    """Not the 0600 of a mkstemp-style temp file: the checkpoint is readable as any new file."""
    old = os.umask(0o022)
    try:
        ll.save(attached, tmp_path / "adapter.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "adapter.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664)])
def test_every_written_file_gets_what_open_gives_under_the_umask(attached, tmp_path, umask, mode):
    """One atomic writer for every file the library writes: the checkpoint and both files of a
    PEFT export get 0666 & ~umask, like a plain open(), never a temp file's 0600."""
    old = os.umask(umask)
    try:
        ll.save(attached, tmp_path / "adapter.safetensors")
        ll.export_peft(attached, tmp_path / "peft")
    finally:
        os.umask(old)
    for f in ("adapter.safetensors", "peft/adapter_model.safetensors", "peft/adapter_config.json"):
        assert (tmp_path / f).stat().st_mode & 0o777 == mode, f
    assert sorted(os.listdir(tmp_path / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
