"""Hostile and edge input against the public API, the layers, packed files and the `candle` command: every bad
input raises a clear error naming the argument, nothing a file names is executed, nothing crashes the process.
Calls that could crash (huge geometry reaching the kernels) run in a subprocess, so a segfault fails the test
instead of killing the run."""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import candle_ext
from candle_ext import reference
from candle_ext.models import load_packed, reactnet_a, save_packed
from candle_ext.models import packed as packed_module
from candle_ext.nn import BinaryConv2d, LearnableBias, RPReLU, RSign

pytestmark = pytest.mark.usefixtures("one_thread")


def _run_isolated(code: str, env=None, timeout=300):
    """Run `code` in a fresh interpreter; returns (exit status, stdout + stderr)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ packed files


def _rewrite(src, dst, **changes):
    """A copy of the packed file `src` with header fields changed and a valid checksum (a well-formed forgery)."""
    blob = torch.load(src, weights_only=True)
    blob.update(changes)
    header = {k: blob[k] for k in packed_module._HEADER_KEYS}
    blob["sha256"] = packed_module._digest(header, blob["data"])
    torch.save(blob, dst)
    return dst


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("packed") / "good.pt"
    torch.manual_seed(3)
    save_packed(reactnet_a(num_classes=4, small_input=True, width_mult=0.125), path)
    return path


EVIL_ARCHES = [
    {"builder": "subprocess.run", "kwargs": {"args": ["touch", "{marker}"]}},
    {"builder": "os.system", "kwargs": {"command": "touch {marker}"}},
    {"builder": "builtins.exec", "kwargs": {"source": "open('{marker}', 'w')"}},
    # nested: an allowed-looking module path whose function builds what its own kwargs name
    {"builder": "candle_ext.models.packed._build",
     "kwargs": {"arch": {"builder": "subprocess.run", "kwargs": {"args": ["touch", "{marker}"]}},
                "source": "x"}},
    # a module re-exported under candle_ext.models (aliased) and dotted paths through attributes
    {"builder": "candle_ext.models.reactnet.torch.load", "kwargs": {"f": "{marker}"}},
    {"builder": "candle_ext.models.packed.importlib.import_module", "kwargs": {"name": "antigravity"}},
    {"builder": "candle_ext.models.packed.os.system", "kwargs": {"command": "touch {marker}"}},
    {"builder": "torchvision.models.resnet.torch.hub.load", "kwargs": {"repo_or_dir": "{marker}"}},
    {"builder": "timm.models._builder.load_checkpoint", "kwargs": {"checkpoint_path": "{marker}"}},
    {"builder": "torchvision.models.get_model", "kwargs": {"name": "resnet18"}},
    {"builder": "timm.create_model", "kwargs": {"model_name": "resnet18", "checkpoint_path": "{marker}"}},
    {"builder": "timm.create_model", "kwargs": {"model_name": "../../../tmp/evil"}},
    {"builder": "candle_ext.models.reactnet_a", "kwargs": {"num_classes": 4, "width_mult": 1e9}},
    {"builder": "candle_ext.models.reactnet_a", "kwargs": {"num_classes": 10**12}},
    {"builder": "candle_ext.models.reactnet_a", "kwargs": {}, "extra": "subprocess.run"},
    "candle_ext.models.reactnet_a",
]


@pytest.mark.parametrize("arch", EVIL_ARCHES, ids=lambda a: str(a)[:60])
def test_load_packed_never_calls_what_a_file_names(good_file, tmp_path, arch):
    marker = tmp_path / "ran"

    def fill(v):
        if isinstance(v, str):
            return v.replace("{marker}", str(marker))
        if isinstance(v, list):
            return [fill(x) for x in v]
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        return v

    evil = _rewrite(good_file, tmp_path / "evil.pt", arch=fill(arch))
    # In a subprocess: whatever happens must not be a side effect on this test process either.
    code = f"""
        import candle_ext
        try:
            candle_ext.load_packed({str(evil)!r})
        except ValueError as exc:
            print("REFUSED", exc)
        """
    rc, out = _run_isolated(code)
    assert rc == 0, out
    assert "REFUSED" in out and str(evil) in out, out
    assert not marker.exists(), "a builder named by the file ran"


def test_load_packed_rejects_weight_words_with_pad_bits(good_file, tmp_path):
    blob = torch.load(good_file, weights_only=True)
    index = blob["index"]
    # Find a packed weight whose conv has a channel count that is not a multiple of 32 and set its pad bits.
    model = load_packed(good_file)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, candle_ext.models.PackedBinaryConv2d)}
    name = next(n for n, m in convs.items() if m.in_channels % 32)
    key = f"{name}.weight_packed"
    offset = 0
    for k, dtype, shape in index:
        count = int(torch.tensor(shape).prod()) if shape else 1
        if k == key:
            break
        if dtype == "int32":
            offset += count
    blob["data"]["int32"][offset:offset + count] = -1  # every bit set, pad bits included
    bad = _rewrite(good_file, tmp_path / "padbits.pt", data=blob["data"])
    with pytest.raises(ValueError, match="pad bits") as info:
        load_packed(bad)
    assert str(bad) in str(info.value)


def test_save_packed_to_unwritable_path_names_it(tmp_path):
    model = reactnet_a(num_classes=3, small_input=True, width_mult=0.125)
    target = tmp_path / "no" / "such" / "folder" / "m.pt"
    with pytest.raises(OSError, match="no/such/folder"):
        save_packed(model, target)


def _edited(src, dst, edit, checksum=True):
    """A copy of the packed file `src` after edit(blob), with a recomputed checksum unless checksum=False (it
    cannot be computed for the fields that are not plain data)."""
    blob = torch.load(src, weights_only=True)
    edit(blob)
    if checksum:
        blob["sha256"] = packed_module._digest({k: blob[k] for k in packed_module._HEADER_KEYS}, blob["data"])
    torch.save(blob, dst)
    return dst


def _append_index(shape):
    return lambda blob: blob["index"].append(["extra", "float32", shape])


MALFORMED = {
    # header fields that torch.load(weights_only=True) reads but the JSON checksum cannot take
    "arch kwargs tensor": (lambda b: b["arch"]["kwargs"].__setitem__("num_classes", torch.tensor(4)), False),
    "half tensor": (lambda b: b.__setitem__("half", torch.tensor(True)), False),
    "arch builder bytes": (lambda b: b["arch"].__setitem__("builder", b"candle_ext.models.reactnet_a"), False),
    "arch kwargs int key": (lambda b: b["arch"]["kwargs"].__setitem__(1, 2), False),
    "version tensor": (lambda b: b.__setitem__("version", torch.tensor([1, 1])), False),
    # index entries and data that torch cannot make a tensor of
    "index dims overflow": (_append_index([2**62, 2**62, 0]), True),
    "index dim past int64": (_append_index([2**64, 0]), True),
    "index dim bool": (_append_index([True, 0]), True),
    "index too long": (lambda b: b["index"].extend([f"z{i}", "float32", [0]] for i in range(70_000)), True),
    "index dtype list": (lambda b: b["index"][0].__setitem__(1, ["float32"]), True),
    "data sparse": (lambda b: b["data"].__setitem__("float32", b["data"]["float32"].to_sparse()), False),
    "data meta": (lambda b: b["data"].__setitem__("float32", torch.empty(len(b["data"]["float32"]), device="meta")),
                  False),
    # a stride-0 view: 4 stored bytes standing for the whole record (as large as the index likes; the checksum
    # and the model would allocate it)
    "data expanded": (lambda b: b["data"].__setitem__("float32", torch.zeros(1).expand(len(b["data"]["float32"]))),
                      False),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("damage", list(MALFORMED))
def test_load_packed_malformed_fields_raise_value_error_naming_the_file(good_file, tmp_path, damage):
    edit, checksum = MALFORMED[damage]
    bad = _edited(good_file, tmp_path / "bad.pt", edit, checksum)
    with pytest.raises(ValueError, match=r"\.pt: (malformed packed model file|packed format version)") as info:
        load_packed(bad)
    assert str(bad) in str(info.value)


# Loads `path` with the address space limited to what is mapped now + 3 GiB (a file that made load_packed
# allocate its model would fail or be killed, not exhaust the machine), and prints what happened and how much
# the resident memory grew.
_LOAD_LIMITED = """
    import resource
    import candle_ext
    vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 3 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        candle_ext.load_packed(path)
        print("LOADED")
    except ValueError as exc:
        print("REFUSED", exc)
    print("GROWN_MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024)
    """

# A builder for the tests below, put on load_packed's allow-list in the subprocess: its kwargs size a buffer that
# no file holds (non-persistent), and the fc; `meta=False` makes it read a tensor's value as it builds (as
# torchvision's regnets do), so it cannot be built on the meta device.
_TEST_BUILDER = """
    import candle_ext
    import torch
    from torch import nn
    from candle_ext.models import packed as packed_module
    from candle_ext.nn import BinaryConv2d, RSign

    class Net(nn.Module):
        def __init__(self, table=16, classes=4, meta=True):
            super().__init__()
            width = 8 if meta else int(torch.arange(8).sum().item()) - 20
            self.body = nn.Sequential(RSign(8), BinaryConv2d(8, width, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
            self.fc = nn.Linear(width, classes)
            self.register_buffer("table", torch.zeros(table), persistent=False)

        def forward(self, x):
            return self.fc(self.body(x)) + self.table.sum()

    builders = packed_module._candle_builders()
    packed_module._candle_builders = lambda: {**builders, "candle_ext.models.test_net": Net}
    """


def _load_limited(path, *setup, timeout=300):
    code = "".join(textwrap.dedent(part) for part in (*setup, f"path = {str(path)!r}\n", _LOAD_LIMITED))
    rc, out = _run_isolated(code, timeout=timeout)
    assert rc == 0, f"process died with status {rc}: {out}"
    return out, float(out.split("GROWN_MB")[1])


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS")


@linux_only
def test_load_packed_refuses_a_huge_arch_before_building_it(good_file, tmp_path):
    """~300 KB naming the largest ReActNet-A the kwargs limits allow (~88 GiB of float weights): refused after a
    comparison on the meta device, before anything of that size is allocated."""
    arch = {"builder": "candle_ext.models.reactnet_a",
            "kwargs": {"num_classes": 1_000_000, "small_input": True, "width_mult": 16.0}}
    bad = _rewrite(good_file, tmp_path / "huge.pt", arch=arch)
    out, grown_mb = _load_limited(bad)
    assert "REFUSED" in out and str(bad) in out and "do not fit" in out, out
    assert grown_mb < 500, out


@linux_only
@pytest.mark.parametrize("padding", ["none", "empty", "tiny"])
def test_load_packed_refuses_a_deep_arch_while_building_it(good_file, tmp_path, padding):
    """A file asking timm for a Swin with a million blocks in one stage: timm builds it on the meta device (no
    memory budget applies), ~70 blocks a second, so the build alone would take hours. Refused by the number of
    modules the builder registers, which grows with the file's tensors: 60,000 empty index entries (free) must
    not raise it, and 60,000 one-element tensors (0.24 MB) raise it only to MAX_MODULES."""
    arch = {"builder": "timm.create_model",
            "kwargs": {"model_name": "swin_tiny_patch4_window7_224", "depths": [2, 2, 10**6, 2]}}
    bad = _rewrite(good_file, tmp_path / "deep.pt", arch=arch)
    if padding != "none":
        size = 0 if padding == "empty" else 1

        def pad(blob):
            blob["index"] += [[f"z{i}", "float32", [size]] for i in range(60_000)]
            blob["data"]["float32"] = torch.cat([blob["data"]["float32"], torch.zeros(60_000 * size)])
        bad = _edited(bad, tmp_path / "padded.pt", pad)
    t0 = time.perf_counter()
    out, grown_mb = _load_limited(bad, timeout=120)
    assert "REFUSED" in out and str(bad) in out and "modules" in out, out
    assert grown_mb < 1000 and time.perf_counter() - t0 < 120, out


BUILDER_CRASHES = [  # allowed builders, valid checksum, kwargs their code does not survive
    ({"builder": "torchvision.models.mobilenet_v2", "kwargs": {"round_nearest": 0}}, "ZeroDivisionError"),
    ({"builder": "torchvision.models.mobilenet_v2", "kwargs": {"width_mult": float("inf")}}, "OverflowError"),
    ({"builder": "torchvision.models.vit_b_16", "kwargs": {"image_size": 225}}, "AssertionError"),
]


@pytest.mark.parametrize("arch,error", BUILDER_CRASHES, ids=lambda a: str(a)[:50])
def test_load_packed_builder_failures_name_the_file(good_file, tmp_path, arch, error):
    bad = _rewrite(good_file, tmp_path / "crash.pt", arch=arch)
    with pytest.raises(ValueError, match=f"rejected kwargs .*{error}") as info:
        load_packed(bad)
    assert str(bad) in str(info.value)


def test_nan_weights_are_refused_on_save_and_load(good_file, tmp_path):
    model = reactnet_a(num_classes=4, small_input=True, width_mult=0.125)
    with torch.no_grad():
        model.classifier.fc.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="save_packed: the model's 'classifier.fc.weight' holds NaN"):
        save_packed(model, tmp_path / "nan.pt")

    def poison(blob):
        blob["data"]["float32"][-1] = float("nan")
    bad = _edited(good_file, tmp_path / "nan.pt", poison)
    with pytest.raises(ValueError, match="holds NaN; the model would compute NaN logits") as info:
        load_packed(bad)
    assert str(bad) in str(info.value)


@linux_only
def test_load_packed_refuses_buffers_no_file_holds(tmp_path):
    """The file's tensors fit the model, but its kwargs ask for a 40 GB non-persistent buffer: refused by the
    model's size on the meta device."""
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    out, _ = _load_limited(good, _TEST_BUILDER, f"""
        candle_ext.save_packed(Net(), {str(good)!r}, arch={{"builder": "candle_ext.models.test_net"}})
        """)
    assert "LOADED" in out, out
    _edited(good, bad, lambda b: b["arch"].__setitem__("kwargs", {"table": 10**10}))
    out, grown_mb = _load_limited(bad, _TEST_BUILDER)
    assert "REFUSED" in out and str(bad) in out and "refused before allocating" in out, out
    assert grown_mb < 500, out


@linux_only
def test_load_packed_budget_for_builders_that_cannot_build_on_meta(tmp_path):
    """A builder that reads tensor values is built for real, under a budget that the file's tensors set: a
    genuine file loads (and equals the model), one asking for a 32 GB fc is refused before it is allocated."""
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    out, _ = _load_limited(good, _TEST_BUILDER, f"""
        arch = {{"builder": "candle_ext.models.test_net", "kwargs": {{"meta": False}}}}
        assert packed_module._meta_skeleton(arch, [], "test") is None
        torch.manual_seed(0)
        model = Net(meta=False).eval()
        candle_ext.save_packed(model, {str(good)!r}, arch=arch)
        x = torch.randn(2, 8, 5, 5)
        with torch.no_grad():
            assert torch.equal(candle_ext.load_packed({str(good)!r})(x), candle_ext.freeze(model)(x))
        """)
    assert "LOADED" in out, out
    _edited(good, bad, lambda b: b["arch"].__setitem__("kwargs", {"meta": False, "classes": 10**9}))
    out, grown_mb = _load_limited(bad, _TEST_BUILDER)
    assert "REFUSED" in out and str(bad) in out and "refused before allocating" in out, out
    assert grown_mb < 500, out


# ------------------------------------------------------------------------------------- huge geometry


@pytest.mark.parametrize("kwargs", [
    {"padding": 2**60, "stride": 2**61},
    {"padding": 2**62},
    {"dilation": 2**61},
    {"dilation": 2**31},
    {"stride": 2**63 - 1},
    {"padding": (2**31 - 2, 0)},
    {"padding": 2**30, "dilation": 2**30},
])
def test_huge_geometry_is_refused_without_crashing(kwargs):
    code = f"""
        import torch, candle_ext
        x, w = torch.randn(1, 4, 6, 6), torch.randn(2, 4, 3, 3)
        try:
            y = candle_ext.binary_conv2d(x, w, **{kwargs!r})
            print("ACCEPTED", tuple(y.shape))
        except ValueError as exc:
            print("REFUSED", exc)
        """
    rc, out = _run_isolated(code)
    assert rc == 0, f"process died with status {rc}: {out}"
    assert "REFUSED" in out, out
    assert any(word in out for word in ("padding", "dilation", "stride", "limit")), out


@pytest.mark.parametrize("args", [
    (2**60, 2**60, 0, 0, 1, 1),  # stride
    (1, 1, 2**60, 2**60, 1, 1),  # padding
    (1, 1, 0, 0, 2**62, 2**62),  # dilation
    (1, 1, 2**31 - 1, 0, 1, 1),  # padded extent past the limit
    (1, 1, -5, 0, 1, 1),
    (0, 1, 0, 0, 1, 1),
])
@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
def test_compiled_kernel_checks_geometry_itself(args, isa):
    """The C++ entry point checks geometry itself (Python's checks are bypassed here), on every ISA path: the
    machine's own, AVX2 (x86) and the portable one."""
    import platform
    if isa == "avx2" and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("AVX2 is an x86 path")
    code = f"""
        import torch, candle_ext
        from candle_ext import backend
        C = backend.compiled_module()
        xp = candle_ext.sign_pack(torch.randn(1, 4, 6, 6)); wp = candle_ext.sign_pack(torch.randn(2, 4, 3, 3))
        try:
            C.binary_conv2d_cpu(xp, wp, 4, *{args!r}, None, None, C.OutKind.int32, None, None, None)
            print("ACCEPTED")
        except ValueError as exc:
            print("REFUSED", exc)
        """
    rc, out = _run_isolated(code, {} if isa == "native" else {"CANDLE_EXT_CPU_ISA": isa})
    assert rc == 0, f"process died with status {rc}: {out}"
    assert "REFUSED" in out and "CANDLE_EXT_CPU_ISA" not in out, out


@pytest.mark.parametrize("change, name", [
    ("pass", None),  # the arguments as they are: accepted
    ("w1 = candle_ext.sign_pack(torch.randn(16, 40, 1, 1))", "w1_packed"),   # words for 40 channels, y has 8
    ("w1 = candle_ext.sign_pack(torch.randn(12, 8, 1, 1))", "w1_packed"),    # not a multiple of y's 8 channels
    ("w1 = candle_ext.sign_pack(torch.randn(16, 8, 3, 3))", "w1_packed"),    # not a 1x1 conv
    ("t1 = torch.zeros(5)", "threshold1"),
    ("v1 = torch.ones(3)", "scale1"),
    ("nxt = torch.zeros(7)", "pack_threshold"),
    ("res = torch.randn(1, 8, 5, 5)", "residual"),
    ("stride = 2**60", "stride"),
])
def test_block_entry_checks_its_arguments(change, name):
    """The one-call ReActNet block (react_block_cpu_nhwc) refuses inconsistent arguments with an error naming
    them (run in a subprocess: a missed check could crash)."""
    code = f"""
        import torch, candle_ext
        from candle_ext import backend
        C = backend.compiled_module()
        xp = candle_ext.sign_pack(torch.randn(1, 8, 6, 6)); w3 = candle_ext.sign_pack(torch.randn(8, 8, 3, 3))
        w1 = candle_ext.sign_pack(torch.randn(16, 8, 1, 1))
        v3, v1, t1, nxt = torch.ones(8), torch.ones(16), torch.zeros(8), torch.zeros(16)
        res, stride = torch.randn(1, 8, 6, 6), 1
        {change}
        try:
            C.react_block_cpu_nhwc(xp, w3, 8, stride, stride, 1, 1, 1, 1, v3, v3, res, False, v3, t1, w1, v1, v1,
                                   v1, v1, nxt)
            print("ACCEPTED")
        except ValueError as exc:
            print("REFUSED", exc)
        """
    rc, out = _run_isolated(code)
    assert rc == 0, f"process died with status {rc}: {out}"
    assert ("ACCEPTED" in out) if name is None else ("REFUSED" in out and name in out), out


@pytest.mark.parametrize("change, name", [
    ("pass", None),  # the arguments as they are: accepted
    ("blocks = []", "at least one block"),
    ("blocks[0] = (3,) + blocks[0][1:]", "blocks[0]: the block stride must be 1 or 2"),
    ("blocks[1] = blocks[1][:14] + (candle_ext.sign_pack(torch.randn(16, 40, 1, 1)),) + blocks[1][15:]",
     "blocks[1]: w1_packed"),
    ("blocks[1] = blocks[1][:1] + (torch.zeros(5),) + blocks[1][2:]", "blocks[0]: pack_threshold"),  # packed for it
    ("blocks[0] = blocks[0][:2] + (candle_ext.sign_pack(torch.randn(8, 40, 3, 3)),) + blocks[0][3:]",
     "blocks[0]"),  # x_packed has 8 channels' words, the weights 40
    ("x = torch.randn(1, 8, 5, 5)", "blocks[0]: residual"),  # not the size x_packed has
    ("x = torch.randn(8, 6, 6)", "x must have 4 dimensions"),
    ("x = x.double()", "x has dtype"),
    ("nxt = torch.zeros(7)", "blocks[1]: pack_threshold"),
    ("blocks[1] = blocks[1][:5]", "incompatible function arguments"),  # not a block tuple
])
def test_chain_entry_checks_its_arguments(change, name):
    """The one-call run of blocks (react_chain_cpu_nhwc) refuses inconsistent arguments with an error naming them
    and the block they belong to (run in a subprocess: a missed check could crash)."""
    code = f"""
        import torch, candle_ext
        from candle_ext import backend
        C = backend.compiled_module()
        x = torch.randn(1, 8, 6, 6)
        xp = candle_ext.sign_pack(x)
        w3 = candle_ext.sign_pack(torch.randn(8, 8, 3, 3))
        w1 = candle_ext.sign_pack(torch.randn(8, 8, 1, 1))
        v, t, nxt = torch.ones(8), torch.zeros(8), torch.zeros(8)
        blocks = [(1, t, w3, 8, 1, 1, 1, 1, 1, 1, v, v, v, t, w1, v, v, v, v)] * 2
        {change}
        try:
            C.react_chain_cpu_nhwc(x, xp, blocks, nxt)
            print("ACCEPTED")
        except (ValueError, TypeError) as exc:
            print("REFUSED", exc)
        """
    rc, out = _run_isolated(code)
    assert rc == 0, f"process died with status {rc}: {out}"
    assert ("ACCEPTED" in out) if name is None else ("REFUSED" in out and name in out), out


def test_huge_padding_takes_no_huge_allocation():
    # padding = dilation = 4096 on a 6x6 input: legal (F.conv2d accepts it), 6x6 output, and exact; the AVX2
    # path would have materialised a ~8200x8200 padded image, so the call goes to the path that skips taps.
    code = """
        import resource, torch, candle_ext
        from candle_ext import reference
        torch.manual_seed(0)
        x, w = torch.randn(1, 40, 6, 6), torch.randn(3, 40, 3, 3)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        y = candle_ext.binary_conv2d(x, w, padding=4096, dilation=4096, out_dtype=torch.int32)
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        ref = reference.binary_conv2d(x, w, padding=(4096, 4096), dilation=(4096, 4096)).round().int()
        print("EQUAL", torch.equal(y, ref), "GROWN_MB", grown_mb)
        """
    rc, out = _run_isolated(code)
    assert rc == 0, out
    assert "EQUAL True" in out, out
    assert float(out.split("GROWN_MB")[1]) < 100, out


# ---------------------------------------------------------------------------- silently misread words


def test_packed_weight_with_pad_bits_is_refused():
    torch.manual_seed(0)
    x = torch.randn(1, 60, 5, 5)
    wp = candle_ext.sign_pack(torch.randn(4, 64, 3, 3))  # 64 channels: bits 60..63 may be set
    assert (wp[..., -1] & candle_ext.ops.bitpack.pad_mask(60)).any()
    with pytest.raises(ValueError, match="pad bits"):
        candle_ext.binary_conv2d(x, wp, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="pad bits"):
        reference.binary_conv2d_packed(candle_ext.sign_pack(x), wp, 60)


@pytest.mark.parametrize("channels", [1, 5, 31, 33, 63])
def test_words_of_minus_one_are_refused_for_every_partial_word(channels):
    words = torch.full((1, 3, 3, (channels + 31) // 32), -1, dtype=torch.int32)
    w = torch.full((2, 1, 1, (channels + 31) // 32), -1, dtype=torch.int32)
    with pytest.raises(ValueError, match="pad bits"):
        candle_ext.binary_conv2d(words, w, in_channels=channels, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="pad bits"):
        candle_ext.unpack(words, channels)


@pytest.mark.parametrize("channels", [32, 64])
def test_full_words_have_no_pad_bits(channels):
    words = torch.full((1, 3, 3, channels // 32), -1, dtype=torch.int32)
    w = torch.full((2, 1, 1, channels // 32), -1, dtype=torch.int32)
    out = candle_ext.binary_conv2d(words, w, in_channels=channels, out_dtype=torch.int32)
    assert torch.equal(out, torch.full((1, 2, 3, 3), channels, dtype=torch.int32))


def test_float_input_channels_must_match_packed_weight():
    wp = candle_ext.sign_pack(torch.randn(4, 60, 3, 3))
    with pytest.raises(ValueError, match="in_channels|channels"):
        candle_ext.binary_conv2d(torch.randn(1, 60, 5, 5), wp, in_channels=59)
    with pytest.raises(ValueError, match="words"):
        candle_ext.binary_conv2d(torch.randn(1, 70, 5, 5), wp)


@pytest.mark.parametrize("layer", [BinaryConv2d(4, 8, 1), BinaryConv2d(4, 8, 3, padding=1)])
def test_layers_refuse_integer_input(layer):
    with pytest.raises(TypeError, match="input has dtype int32"):
        layer(torch.randint(0, 5, (2, 4, 6, 1), dtype=torch.int32))
    with pytest.raises(TypeError, match="input has dtype int64"):
        layer(torch.randint(0, 5, (2, 4, 6, 6)))


def test_float64_is_computed_in_float64():
    torch.manual_seed(1)
    x, w = torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)
    scale = torch.tensor([1e40, 1e-50], dtype=torch.float64)
    out = candle_ext.binary_conv2d(x, w, scale=scale, padding=1)
    ref = reference.binary_conv2d(x, w, scale, padding=(1, 1))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    assert torch.equal(out, ref)
    # out_dtype float64 on the packed path too
    packed = candle_ext.binary_conv2d(x, candle_ext.sign_pack(w), scale=scale, padding=1, out_dtype=torch.float64)
    assert torch.equal(packed, ref)
    s = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s_: candle_ext.binary_conv2d(x, w, scale=s_, padding=1), (s,))


def test_packed_path_with_gradients_fails_at_the_call():
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    wp = candle_ext.sign_pack(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="no gradient"):
        candle_ext.binary_conv2d(x, wp)
    with torch.no_grad():
        assert candle_ext.binary_conv2d(x, wp).shape == (1, 2, 3, 3)


# ------------------------------------------------------------------------------------- error messages


@pytest.mark.parametrize("call, error, match", [
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 5, 4, 4), torch.randn(2, 5, 1, 1), scale=[1.0] * 2),
     TypeError, "scale must be a"),
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 5, 4, 4), torch.randn(2, 5, 1, 1), shift="0"),
     TypeError, "shift must be a"),
    (lambda: candle_ext.binary_conv2d(candle_ext.sign_pack(torch.randn(1, 32, 4, 4)),
                                      candle_ext.sign_pack(torch.randn(2, 32, 1, 1)), in_channels="32"),
     TypeError, "in_channels must be an int"),
    (lambda: candle_ext.binary_conv2d(candle_ext.sign_pack(torch.randn(1, 32, 4, 4)),
                                      candle_ext.sign_pack(torch.randn(2, 32, 1, 1)), in_channels=2.5),
     TypeError, "in_channels must be an int"),
    (lambda: candle_ext.binary_conv2d(candle_ext.sign_pack(torch.randn(1, 32, 4, 4)),
                                      candle_ext.sign_pack(torch.randn(2, 32, 1, 1)), in_channels=0),
     ValueError, "in_channels must lie in"),
    (lambda: candle_ext.binary_conv2d(candle_ext.sign_pack(torch.randn(1, 32, 4, 4)),
                                      candle_ext.sign_pack(torch.randn(2, 32, 1, 1)), in_channels=True),
     TypeError, "in_channels must be an int"),
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 5, 4, 4), torch.randn(2, 5, 1, 1), stride=True),
     TypeError, "stride"),
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 5, 4, 4), torch.randn(2, 5, 1, 1), padding=1.5),
     TypeError, "padding"),
    (lambda: candle_ext.binary_conv2d([[1.0]], torch.randn(2, 5, 1, 1)), TypeError, "input must be a torch.Tensor"),
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 5, 4, 4), torch.randn(2, 5, 1, 1), out_dtype=torch.int64),
     TypeError, "out_dtype"),
    (lambda: BinaryConv2d("32", 8, 3), TypeError, "in_channels must be an int"),
    (lambda: BinaryConv2d(2.5, 8, 3), TypeError, "in_channels must be an int"),
    (lambda: BinaryConv2d(0, 8, 3), ValueError, "in_channels must lie in"),
    (lambda: BinaryConv2d(True, 8, 3), TypeError, "in_channels must be an int"),
    (lambda: BinaryConv2d(4, 8, 3, stride=0), ValueError, "stride"),
    (lambda: BinaryConv2d(4, 8, 0), ValueError, "kernel_size"),
    (lambda: RSign(4)(torch.randn(2, 3, 5, 5)), ValueError, r"RSign\(4\) got input of shape \(2, 3, 5, 5\)"),
    (lambda: LearnableBias(4)(torch.randn(2, 3, 5, 5)), ValueError, r"LearnableBias\(4\)"),
    (lambda: RPReLU(4)(torch.randn(2, 3, 5, 5)), ValueError, r"RPReLU\(4\)"),
    (lambda: RSign("4"), TypeError, "channels must be an int"),
    (lambda: RSign(4)(torch.zeros(2, 4, 3, 3, dtype=torch.int32)), TypeError, "input has dtype int32"),
    (lambda: candle_ext.multires_head(torch.randn(2, 8, 4, 4), [torch.randn(3, 8)]), TypeError,
     "features must be a list or tuple of tensors"),
    (lambda: candle_ext.multires_head([torch.randn(2, 8, 4, 4)], torch.randn(3, 8)), TypeError,
     "weights must be a list or tuple"),
    (lambda: candle_ext.multires_head([torch.randn(2, 8, 4, 4)], [torch.randn(3, 8)], base="0"), TypeError,
     "base must be an int"),
    (lambda: candle_ext.unpack(torch.zeros(1, 2, 2, 1, dtype=torch.int32), "5"), TypeError,
     "channels must be an int"),
    (lambda: candle_ext.models.PackedBinaryConv2d("8", 4, 3), TypeError, "in_channels must be an int"),
    (lambda: reactnet_a(num_classes=True), ValueError, "num_classes"),
    (lambda: reactnet_a(num_classes=10, width_mult=1e6), ValueError, "width_mult"),
])
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("value", ["garbage", "AVX2 ", "avx9000"])
def test_unknown_cpu_isa_is_refused(value):
    code = """
        import torch, candle_ext
        try:
            candle_ext.binary_conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3), out_dtype=torch.int32)
            print("ACCEPTED")
        except ValueError as exc:
            print("REFUSED", exc)
        """
    rc, out = _run_isolated(code, {"CANDLE_EXT_CPU_ISA": value})
    assert rc == 0, out
    assert "REFUSED" in out and "CANDLE_EXT_CPU_ISA" in out, out


# --------------------------------------------------------------- files the package reads (candle_ext.files)

def _compressed_record_file(path):
    """A torch.save file whose tensor record was rewritten deflate-compressed (a zip bomb's shape; small here)."""
    import io
    import zipfile
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4096)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            kind = zipfile.ZIP_DEFLATED if info.filename.endswith("/data/0") else zipfile.ZIP_STORED
            dst.writestr(zipfile.ZipInfo(info.filename), src.read(info.filename), compress_type=kind)
    return path


def test_torch_files_with_compressed_records_are_refused_before_loading(tmp_path):
    from candle_ext.train import checkpoint
    bomb = _compressed_record_file(tmp_path / "bomb.pt")
    with pytest.raises(ValueError, match=r"checkpoint .*bomb.pt is not a torch.save file: its record .* compressed"):
        checkpoint.load(str(bomb))
    with pytest.raises(ValueError, match=r"packed model file .*bomb.pt is not a torch.save file"):
        load_packed(bomb)
    torch.save({"w": torch.zeros(3)}, tmp_path / "plain.pt")
    assert torch.equal(checkpoint.load(str(tmp_path / "plain.pt"))["w"], torch.zeros(3))


def test_fifos_and_devices_are_refused_not_read(tmp_path):
    """A FIFO would block the reader for ever, /dev/zero never ends: every reader refuses what is not a regular
    file (in a subprocess: without the check these calls hang)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code = f"""
        from candle_ext import files, load_packed
        from candle_ext.train import checkpoint
        from candle_ext.train.evaluate import lambda_values
        for call in (lambda: checkpoint.load({str(fifo)!r}), lambda: load_packed({str(fifo)!r}),
                     lambda: files.read_json({str(fifo)!r}, "report"), lambda: lambda_values({str(fifo)!r}),
                     lambda: files.read_json("/dev/zero", "report")):
            try:
                call()
                print("READ")
            except ValueError as exc:
                print("REFUSED", exc)
        """
    rc, out = _run_isolated(code, timeout=120)
    assert rc == 0 and out.count("REFUSED") == 5 and "not a regular file" in out, out


def test_config_files_with_aliases_or_bad_text_are_refused_naming_the_file(tmp_path):
    from candle_ext.cli import load_config
    laughs = tmp_path / "laughs.yaml"  # ~400 bytes that stand for 10**9 list items once walked
    rows = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    laughs.write_text("\n".join(rows) + "\nteacher:\n  resolutions: *a8\n")
    cases = {laughs: "aliases .* are not allowed",
             tmp_path / "latin1.yaml": "is not UTF-8 text", tmp_path / "deep.json": "is not valid JSON",
             tmp_path / "digits.yaml": "is not valid YAML"}
    (tmp_path / "latin1.yaml").write_bytes(b"seed: 1\n# caf\xe9\n")
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    (tmp_path / "digits.yaml").write_text("seed: " + "9" * 5000 + "\n")
    for path, match in cases.items():
        start = time.time()
        with pytest.raises(ValueError, match=f"config file {path}.*{match}"):
            load_config(str(path))
        assert time.time() - start < 10, path
    with pytest.raises(ValueError, match="--set seed: cannot read"):
        load_config(None, ["seed=" + "9" * 5000])


def test_data_files_are_bounded_before_they_are_decoded(tmp_path):
    import gzip
    import struct
    from PIL import Image
    from candle_ext.data.sources import FileImageSet, _read_idx, split_file
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png", optimize=True)  # ~10 KB, 81M pixels
    with pytest.raises(ValueError, match=r"9000x9000 pixels, more than .* decompression bomb"):
        FileImageSet([str(tmp_path / "bomb.png")], [0], ["a"], where="test").load(0)
    (tmp_path / "split.txt").write_bytes(b"a.png 0\nb\xff.png 1\n")
    with pytest.raises(ValueError, match=r"split file .*split.txt line 2: not UTF-8"):
        split_file(str(tmp_path / "split.txt"), str(tmp_path))
    (tmp_path / "long.txt").write_bytes(b"x" * 100_000 + b" 0\n")
    with pytest.raises(ValueError, match=r"line 1: longer than 65536 bytes"):
        split_file(str(tmp_path / "long.txt"), str(tmp_path))
    if sys.platform.startswith("linux"):  # a sparse 8 GiB file without a newline: refused within 256 MB more
        with open(tmp_path / "sparse.txt", "wb") as fh:
            fh.truncate(8 << 30)
        rc, out = _run_isolated(f"""
            import resource
            from candle_ext.data.sources import split_file
            vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
            try:
                split_file({str(tmp_path / "sparse.txt")!r}, "/")
            except ValueError as exc:
                print("REFUSED", exc)
            """)
        assert rc == 0 and "REFUSED" in out and "line 1: longer than 65536 bytes" in out, out
    with gzip.open(tmp_path / "lying.gz", "wb") as fh:  # a header for 4 bytes, then megabytes more
        fh.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 4) + bytes(1 << 22))
    with pytest.raises(ValueError, match=r"header says \(4,\) \(4 bytes\) but holds more"):
        _read_idx(str(tmp_path / "lying.gz"))
    (tmp_path / "huge.idx").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 65536, 65536, 65536))
    with pytest.raises(ValueError, match=r"more than the \d+ bytes an idx file may hold"):
        _read_idx(str(tmp_path / "huge.idx"))


# ------------------------------------------------------------------- run folders, checkpoints and records


class _Order:
    """A sampler for fit: 4 indices, any epoch."""

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        return iter(range(4))

    def __len__(self):
        return 4


class _NoState:
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _toy_fit(out, epochs=1, resume=False, stateful=None, made_with=None):
    from candle_ext.train.loop import fit
    return fit(str(out), "toy", epochs, _Order(), 2, lambda idx: {"loss": 1.0}, stateful or {"x": _NoState()},
               resume=resume, progress=False, made_with=made_with)


def test_links_in_a_run_folder_are_never_written_through(tmp_path):
    """An out folder handed over with a link in it (toy.jsonl -> a file elsewhere) must not make a run truncate
    or append to the link's target: logs refuse links, reports and checkpoints replace them."""
    import json
    from candle_ext.train import checkpoint
    from candle_ext.train.evaluate import write_json
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    out = tmp_path / "run"
    out.mkdir()
    for log in ("toy.jsonl", "toy_epochs.jsonl"):
        os.symlink(precious, out / log)
        with pytest.raises(ValueError, match=f"{log} is a symbolic link"):
            _toy_fit(out)
        os.unlink(out / log)
    assert precious.read_text() == "keep"
    for name, write, read in [("report.json", lambda p: write_json({"a": 1}, str(p)), lambda p: json.loads(p.read_text())),
                              ("ck.pt", lambda p: checkpoint.save_atomic({"a": 1}, str(p)), lambda p: checkpoint.load(str(p)))]:
        link = tmp_path / name
        os.symlink(precious, link)
        write(link)
        assert precious.read_text() == "keep" and not link.is_symlink() and read(link) == {"a": 1}, name


def _crafted_resume(tmp_path, edit, stateful=None, made_with=None):
    """A real one-epoch checkpoint of _toy_fit, edited, then resumed for a second epoch."""
    out = tmp_path / "run"
    _toy_fit(out, stateful=stateful, made_with=made_with)
    ck = torch.load(out / "toy_last.pt", weights_only=True)
    edit(ck)
    torch.save(ck, out / "toy_last.pt")
    return lambda: _toy_fit(out, epochs=2, resume=True, stateful=stateful, made_with=made_with)


def _scheduler():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


RESUME_DAMAGE = {
    # a tensor where fit writes numbers: the run would train, then fail writing its report
    "history tensor": (lambda ck: ck["history"][0].__setitem__("epoch", torch.tensor(0)), {}, "history entry 0"),
    "history not dicts": (lambda ck: ck.__setitem__("history", [[1, 2]]), {}, "history entry 0"),
    # 4 stored bytes expanded to 2^22 ints: tuple() would materialise them
    "python rng expanded": (lambda ck: ck["rng"].__setitem__("python", [3, torch.zeros(1, dtype=torch.int64)
                                                                        .expand(2**22), None]), {},
                            "random number generator state cannot be restored"),
    "python rng floats": (lambda ck: ck["rng"]["python"].__setitem__(1, [0.5] * 625), {},
                          "random number generator state cannot be restored"),
    "made_with tensor": (lambda ck: ck.__setitem__("made_with", {"seed": torch.tensor([1, 2])}),
                         {"made_with": {"seed": 0}}, "not plain data"),
    "made_with int key": (lambda ck: ck.__setitem__("made_with", {1: 2}), {"made_with": {"seed": 0}},
                          "not plain data"),
    "made_with not a dict": (lambda ck: ck.__setitem__("made_with", [1]), {"made_with": {"seed": 0}},
                             "not plain data"),
    "scheduler state": (lambda ck: ck["state"].__setitem__("sched", {"optimizer": 5, "last_epoch": "x"}),
                        {"stateful": "scheduler"}, "sched does not fit this run"),
    "scheduler field": (lambda ck: ck["state"]["sched"].__setitem__("last_epoch", "x"),
                        {"stateful": "scheduler"}, r"sched does not fit this run .*\['last_epoch'\]"),
}


@pytest.mark.parametrize("damage", list(RESUME_DAMAGE))
def test_resume_refuses_checkpoint_fields_fit_never_writes(tmp_path, damage):
    edit, options, match = RESUME_DAMAGE[damage]
    stateful = {"sched": _scheduler()} if options.get("stateful") == "scheduler" else None
    resume = _crafted_resume(tmp_path, edit, stateful, options.get("made_with"))
    with pytest.raises(ValueError, match=match) as info:
        resume()
    assert "toy_last.pt" in str(info.value)


def test_state_dict_misfit_names_tensors_that_hold_no_weights():
    from candle_ext.train.checkpoint import state_dict_misfit
    own = {"w": torch.zeros(2, 3), "n": torch.zeros((), dtype=torch.int64)}
    assert state_dict_misfit(own, {"w": torch.ones(2, 3), "n": torch.tensor(4)}) == ""
    cases = {"meta": {"w": torch.empty(2, 3, device="meta")}, "sparse_coo": {"w": torch.zeros(2, 3).to_sparse()},
             "complex": {"w": torch.zeros(2, 3, dtype=torch.complex64)}, "integer": {"w": torch.zeros(2, 3).long()},
             "NaN": {"w": torch.full((2, 3), float("nan"))}}
    for word, change in cases.items():
        assert word in state_dict_misfit(own, {**own, **change}), word


@pytest.mark.filterwarnings("ignore:teacher .resnet18. has neither")
def test_teacher_checkpoint_that_does_not_fit_names_the_file(tmp_path):
    from candle_ext.train import teacher as T
    from candle_ext.train.config import TeacherConfig
    tcfg = TeacherConfig(name="resnet18", resolutions=[32, 48], base=0)
    head = {"proj_weight.0": torch.zeros(8, 512), "proj_weight.1": torch.zeros(8, 512), "proj_bias.0": torch.zeros(8),
            "proj_bias.1": torch.zeros(8), "fc.weight": torch.zeros(4, 16), "fc.bias": torch.zeros(4)}
    good = {"head": head, "name": "resnet18", "resolutions": [32, 48], "base": 0, "num_classes": 4,
            "student_channels": 8}
    torch.save(good, tmp_path / "good.pt")
    T.load_calibrated_teacher(tcfg, str(tmp_path / "good.pt"), num_classes=4)  # the forgeries below differ from it
    for name, ck, match in [("narrow", {**good, "student_channels": 7}, r"proj_weight.0 is \(8, 512\) in the file"),
                            ("nontensor", {**good, "head": {**head, "fc.bias": 5}}, "fc.bias is int in the file"),
                            ("list", {**good, "head": [1]}, "is malformed .*head list"),
                            ("made_with", {**good, "made_with": {"seed": torch.tensor([1, 2])}}, "not plain data")]:
        path = tmp_path / f"{name}.pt"
        torch.save(ck, path)
        with pytest.raises(ValueError, match=match) as info:
            T.load_calibrated_teacher(tcfg, str(path), num_classes=4, record={"seed": 0})
        assert str(path) in str(info.value), name


def test_torchvision_dataset_names_only_dataset_classes(tmp_path):
    from candle_ext.data.sources import torchvision_dataset
    for name in ("utils", "__class__", "ImageFolder", "VisionDataset", "os", "no_such_set"):
        with pytest.raises(ValueError, match=f"data.name '{name}' is not a torchvision dataset class"):
            torchvision_dataset(name, str(tmp_path))
    with pytest.raises(ValueError, match=f"torchvision dataset CIFAR10 in {tmp_path} \\(train split\\)"):
        torchvision_dataset("CIFAR10", str(tmp_path))  # not there, no download


def test_environment_integers_are_checked_by_name(monkeypatch, capsys):
    from candle_ext.cli import main
    monkeypatch.setenv("WORLD_SIZE", "abc")
    assert main(["compare"]) == 2
    assert "environment variable WORLD_SIZE must be an integer, got 'abc'" in capsys.readouterr().err


def test_image_tensors_without_pixels_are_refused():
    from candle_ext.data.sources import TensorImageSet
    with pytest.raises(ValueError, match=r"H, W >= 1, got \(20, 1, 0, 0\)"):
        TensorImageSet(torch.zeros(20, 0, 0, dtype=torch.uint8), [0] * 20, ["a"], where="idx")


@pytest.mark.filterwarnings("ignore:.*weight_norm")
def test_freeze_names_what_it_cannot_copy():
    """freeze works on a copy: a pruned module, or a weight computed by a hook (weight_norm), gets a ValueError
    that says what to do, not torch's deepcopy error about graph leaves."""
    from torch import nn
    from torch.nn.utils import prune

    def model():
        return nn.Sequential(nn.Conv2d(3, 16, 3), RSign(16), BinaryConv2d(16, 8, 3)).eval()
    pruned = model()
    prune.l1_unstructured(pruned[2], "weight", 0.5)
    with pytest.raises(ValueError, match=r"module '2' is pruned \(torch.nn.utils.prune\); call prune.remove"):
        candle_ext.freeze(pruned)
    prune.remove(pruned[2], "weight")
    candle_ext.freeze(pruned)
    normed = model()
    torch.nn.utils.weight_norm(normed[0])
    with pytest.raises(ValueError, match="freeze copies the model, and it cannot be copied: .*remove_weight_norm"):
        candle_ext.freeze(normed)


def test_scheduler_states_of_other_torch_versions_still_resume():
    """The scheduler check refuses what would break the scheduler (a key replacing its optimizer, a string for
    a number) but not the bookkeeping keys torch versions add or drop (`_is_initial`, `verbose`), nor the
    infinities ReduceLROnPlateau keeps."""
    from candle_ext.train.loop import _scheduler_misfit
    sched = _scheduler()
    for _ in range(3):
        sched.optimizer.step()
        sched.step()
    older = {k: v for k, v in sched.state_dict().items() if k != "_is_initial"}
    older["verbose"] = False
    fresh = _scheduler()
    assert _scheduler_misfit(fresh, older) == ""
    fresh.load_state_dict(older)
    assert fresh.last_epoch == 3
    assert "replace the scheduler's own attributes" in _scheduler_misfit(_scheduler(), {**older, "optimizer": 5})
    assert "['last_epoch']" in _scheduler_misfit(_scheduler(), {**older, "last_epoch": "x"})
    assert "needs the keys" in _scheduler_misfit(_scheduler(), {"base_lrs": [0.1]})
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    plateau.step(1.0)
    assert _scheduler_misfit(torch.optim.lr_scheduler.ReduceLROnPlateau(opt), plateau.state_dict()) == ""


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_atomic_writes_keep_an_existing_files_mode(tmp_path):
    from candle_ext import files
    path = tmp_path / "report.md"
    files.write_text(path, "one")
    assert (path.stat().st_mode & 0o777) == 0o666 & ~files._umask()
    os.chmod(path, 0o640)
    files.write_text(path, "two")
    assert path.read_text() == "two" and (path.stat().st_mode & 0o777) == 0o640
