"""Fuzzing the public API through the session's real server (hypothesis, a bounded
number of derandomized examples): Generate/GenerateStream fields, upload streams and
admin requests, with garbage bytes, invalid UTF-8, megabyte strings and extreme numbers.
Every answer is a client error (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, and
ALREADY_EXISTS for admin calls) or OK for a valid input; never INTERNAL or UNKNOWN; and
the server is SERVING afterwards, with its adapters as they were.

Raw bytes go out through stubs whose request serializer is the identity, so the server
sees exactly what hypothesis made, not what the protobuf library would let a client send.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.server.grpc.status import MAX_DETAILS_BYTES
from loraplex.v1 import admin_pb2, generate_pb2
from lora_dirs import layout, raw_safetensors

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])  # fmt: skip
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
GENERATE_CODES = CLIENT_ERRORS | {grpc.StatusCode.OK}
ADMIN_CODES = GENERATE_CODES | {grpc.StatusCode.ALREADY_EXISTS}
GENERATION, ADMIN = "/loraplex.v1.Generation/", "/loraplex.v1.AdapterAdmin/"

# a fuzzer's dictionary: the numbers where arithmetic breaks, beside random ones
NASTY_FLOATS = (5e-324, 1e-310, 1e-45, 1e-40, 1.1754943508222875e-38, 1e-300, 1e300, 1.7976931348623157e308,
                float("inf"), float("-inf"), float("nan"), -0.0, -1.0)  # fmt: skip
NASTY_INTS = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1)
uint32 = st.one_of(st.sampled_from([n for n in NASTY_INTS if n < 2**32]), st.integers(0, 2**32 - 1))
uint64 = st.one_of(st.sampled_from(NASTY_INTS), st.integers(0, 2**64 - 1))
any_float = st.one_of(st.sampled_from(NASTY_FLOATS), st.floats(allow_nan=True, allow_infinity=True))
# megabyte strings: one character (ASCII, 2-, 4-byte UTF-8, NUL, a bidi override) repeated
big_text = st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\U0001f600", " ", "\x00", "\u202e"]),
                     st.sampled_from([1000, 1 << 18]))  # fmt: skip
texts = st.one_of(st.text(max_size=64), big_text)


@pytest.fixture(scope="module")
def wire(hardened, kit):
    """Identity-serialized stubs on one channel: generate(bytes), stream(bytes),
    upload(list of bytes), admin(method, bytes); each returns the status code."""
    channel = grpc.insecure_channel(hardened.target)
    md = (("authorization", f"Bearer {kit.ADMIN_TOKEN}"),)
    ignore = lambda data: data  # noqa: E731 — responses are not looked at

    def code(call) -> grpc.StatusCode:
        try:
            call()
        except grpc.RpcError as e:
            details = e.details() or ""
            assert e.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (e.code(), details)
            # details quote the input at most in part: trailing metadata over the client's
            # 8 KiB limit would turn any status into RESOURCE_EXHAUSTED ("Stream removed")
            assert len(details) <= MAX_DETAILS_BYTES and "metadata size" not in details, details[:200]
            return e.code()
        return grpc.StatusCode.OK

    class Wire:
        def generate(self, data: bytes) -> grpc.StatusCode:
            method = channel.unary_unary(GENERATION + "Generate", request_serializer=None, response_deserializer=ignore)
            return code(lambda: method(data, timeout=60))

        def stream(self, data: bytes) -> grpc.StatusCode:
            method = channel.unary_stream(GENERATION + "GenerateStream", request_serializer=None, response_deserializer=ignore)
            return code(lambda: list(method(data, timeout=60)))

        def upload(self, parts: list[bytes]) -> grpc.StatusCode:
            method = channel.stream_unary(ADMIN + "UploadAdapter", request_serializer=None, response_deserializer=ignore)
            return code(lambda: method(iter(parts), metadata=md, timeout=60))

        def admin(self, name: str, data: bytes) -> grpc.StatusCode:
            method = channel.unary_unary(ADMIN + name, request_serializer=None, response_deserializer=ignore)
            return code(lambda: method(data, metadata=md, timeout=60))

    yield Wire()
    channel.close()


@pytest.fixture(scope="module")
def untouched(hardened, kit):
    """The server's adapters and GOOD's output before the module; checked after it."""
    from loraplex.client import LoraplexClient

    def snapshot():
        with LoraplexClient(hardened.target, timeout=60) as c:
            assert c.health() == "SERVING"
            out = c.generate(kit.PROMPT, kit.GOOD, max_new_tokens=8, ignore_eos=True).token_ids
        return sorted(a.adapter_id for a in hardened.engine.adapters.list()), out

    before = snapshot()
    yield
    hardened.wait_no_leftovers()
    assert snapshot() == before
    hardened.wait_idle()


# -- Generate ---------------------------------------------------------------------------------------
# One field at a time is made extreme in an otherwise valid request, so that the server
# looks at it (a request with eight wrong fields is refused at the first); sometimes all.
EXTREME = {
    "adapter_id": texts,
    "prompt": st.one_of(st.none(), texts, st.lists(uint32, max_size=64)),
    "max_new_tokens": st.one_of(st.just(0), uint32),
    "temperature": any_float,
    "top_k": uint32,
    "top_p": any_float,
    "seed": uint64,
    "stop": st.lists(st.one_of(st.text(max_size=8), big_text), max_size=20),
    "stop_token_ids": st.lists(uint32, max_size=200),
}


@st.composite
def generate_requests(draw, good: str, vocab: int) -> generate_pb2.GenerateRequest:
    valid = {
        "adapter_id": st.sampled_from(["", good]),
        "prompt": st.one_of(st.text(min_size=1, max_size=40), st.lists(st.integers(0, vocab - 1), min_size=1, max_size=16)),
        "max_new_tokens": st.integers(1, 6),
        "temperature": st.one_of(st.just(0.0), st.floats(0.5, 2.0)),
        "top_k": st.integers(0, 50),
        "top_p": st.floats(0.1, 1.0),
        "seed": st.integers(0, 2**63 - 1),
        "stop": st.lists(st.text(min_size=1, max_size=4), max_size=2),
        "stop_token_ids": st.lists(st.integers(0, vocab - 1), max_size=3),
    }
    extreme = draw(st.sampled_from([None, "all", *EXTREME]))
    f = {name: draw(EXTREME[name] if extreme in (name, "all") else strategy) for name, strategy in valid.items()}
    params = generate_pb2.SamplingParameters(temperature=f["temperature"], top_k=f["top_k"], stop=f["stop"],
                                             stop_token_ids=f["stop_token_ids"], ignore_eos=draw(st.booleans()))  # fmt: skip
    for name in ("max_new_tokens", "top_p", "seed"):  # optional fields: sometimes unset
        if extreme == name or draw(st.booleans()):
            setattr(params, name, f[name])
    request = generate_pb2.GenerateRequest(params=params, adapter_id=f["adapter_id"])
    if isinstance(f["prompt"], str):
        request.text = f["prompt"]
    elif isinstance(f["prompt"], list):
        request.token_ids.ids.extend(f["prompt"])
    return request


def test_generate_fields(hardened, kit, wire, untouched):
    @SETTINGS
    @given(request=generate_requests(kit.GOOD, hardened.engine.model.config.vocab_size), stream=st.booleans())
    def check(request, stream):
        data = request.SerializeToString()
        assert (wire.stream if stream else wire.generate)(data) in GENERATE_CODES

    check()


def _invalid_utf8_text(prompt: bytes) -> bytes:
    """A GenerateRequest whose `text` (field 2) holds bytes that are not UTF-8."""
    return b"\x12" + bytes([len(prompt)]) + prompt


def test_generate_garbage_bytes(hardened, wire, untouched):
    for data in (_invalid_utf8_text(b"\xff\xfe"), _invalid_utf8_text(b"ok \xc3\x28"), b"\x0a\x02\xed\xa0" + b"\x12\x01a"):
        assert wire.generate(data) == grpc.StatusCode.INVALID_ARGUMENT
        assert wire.stream(data) == grpc.StatusCode.INVALID_ARGUMENT

    @SETTINGS
    @given(data=st.binary(max_size=512), stream=st.booleans())
    def check(data, stream):
        assert (wire.stream if stream else wire.generate)(data) in GENERATE_CODES

    check()


def test_oversize_messages_are_refused(hardened, wire, untouched):
    request = generate_pb2.GenerateRequest(text="w" * (10 << 20))
    assert wire.generate(request.SerializeToString()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert wire.stream(request.SerializeToString()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    header = admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(adapter_id="oversize"))
    chunk = admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(filename="adapter_model.safetensors", data=b"\0" * (5 << 20)))
    assert wire.upload([header.SerializeToString(), chunk.SerializeToString()]) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "oversize" not in hardened.engine.adapters


def test_megabyte_ids_and_paths_get_their_own_status(hardened, wire, untouched):
    huge = "a" * (1 << 20)
    assert wire.generate(generate_pb2.GenerateRequest(adapter_id=huge, text="hi").SerializeToString()) == grpc.StatusCode.INVALID_ARGUMENT
    assert wire.generate(generate_pb2.GenerateRequest(adapter_id="a" * 128, text="hi").SerializeToString()) == grpc.StatusCode.NOT_FOUND
    header = admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(adapter_id=huge))
    assert wire.upload([header.SerializeToString()]) == grpc.StatusCode.INVALID_ARGUMENT
    for name, message in (("GetAdapter", admin_pb2.GetAdapterRequest(adapter_id=huge)),
                          ("UnloadAdapter", admin_pb2.UnloadAdapterRequest(adapter_id=huge)),
                          ("LoadAdapter", admin_pb2.LoadAdapterRequest(adapter_id="fz-x", path=huge)),
                          ("LoadAdapter", admin_pb2.LoadAdapterRequest(adapter_id=huge, path="x"))):  # fmt: skip
        assert wire.admin(name, message.SerializeToString()) in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), name


# -- admin ------------------------------------------------------------------------------------------
FILE_NAMES = st.one_of(st.sampled_from(["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                                        "../adapter_model.safetensors", ""]), texts)  # fmt: skip


@st.composite
def upload_streams(draw, existing: list[str]) -> list[bytes]:
    """Header and chunk messages in any order, some of them raw junk."""
    ids = st.one_of(st.sampled_from(existing), st.from_regex(r"fz-[a-z0-9]{1,8}", fullmatch=True), texts)
    header = admin_pb2.UploadHeader(adapter_id=draw(ids), replace=draw(st.booleans()))
    config = draw(st.one_of(st.none(), st.sampled_from(['{"peft_type": "LORA", "r": 4}', "{}", "[]", "null"]), texts))
    if config is not None:
        header.config_json = config
    parts = [admin_pb2.UploadAdapterRequest(header=header).SerializeToString()]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["chunk", "chunk", "header", "junk"]))
        if kind == "chunk":
            chunk = admin_pb2.FileChunk(filename=draw(FILE_NAMES), data=draw(st.binary(max_size=2048)))
            parts.append(admin_pb2.UploadAdapterRequest(chunk=chunk).SerializeToString())
        elif kind == "header":
            parts.append(admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(adapter_id=draw(ids))).SerializeToString())
        else:
            parts.append(draw(st.binary(max_size=64)))
    if draw(st.booleans()):
        parts = draw(st.permutations(parts))
    return parts


def test_upload_streams(hardened, kit, wire, untouched):
    existing = sorted(a.adapter_id for a in hardened.engine.adapters.list())

    @SETTINGS
    @given(parts=upload_streams(existing))
    def check(parts):
        code = wire.upload(parts)
        assert code in ADMIN_CODES - {grpc.StatusCode.OK}, code  # nothing here is a valid adapter

    check()


@st.composite
def admin_requests(draw, existing: list[str]) -> tuple[str, bytes]:
    """LoadAdapter, GetAdapter, UnloadAdapter (never of an existing adapter), as bytes."""
    fresh = st.one_of(st.from_regex(r"fz-[a-z0-9]{1,8}", fullmatch=True), texts).filter(lambda s: s not in existing)
    paths = st.one_of(st.sampled_from(["/", "..", "/etc", "../outside", ".upload-x", "a/" * 3000, "good\x00"]), texts)
    method = draw(st.sampled_from(["LoadAdapter", "GetAdapter", "UnloadAdapter", "junk"]))
    if method == "LoadAdapter":
        message = admin_pb2.LoadAdapterRequest(adapter_id=draw(fresh), path=draw(paths), replace=draw(st.booleans()))
    elif method == "GetAdapter":
        message = admin_pb2.GetAdapterRequest(adapter_id=draw(st.one_of(fresh, st.sampled_from(existing))))
    elif method == "UnloadAdapter":
        message = admin_pb2.UnloadAdapterRequest(adapter_id=draw(fresh), delete_files=draw(st.booleans()))
    else:
        return draw(st.sampled_from(["LoadAdapter", "GetAdapter", "UnloadAdapter", "ListAdapters"])), draw(st.binary(max_size=256))
    return method, message.SerializeToString()


def test_admin_requests(hardened, kit, wire, untouched):
    existing = sorted(a.adapter_id for a in hardened.engine.adapters.list())
    assert wire.admin("LoadAdapter", admin_pb2.LoadAdapterRequest(adapter_id="a", path="\xff").SerializeToString()) in ADMIN_CODES
    assert wire.admin("GetAdapter", b"\x0a\x02\xff\xfe") == grpc.StatusCode.INVALID_ARGUMENT

    @SETTINGS
    @given(call=admin_requests(existing))
    def check(call):
        method, data = call
        code = wire.admin(method, data)
        assert code in ADMIN_CODES, code
        if code == grpc.StatusCode.OK and method == "LoadAdapter":  # a real directory under the root: undo
            registered = set(a.adapter_id for a in hardened.engine.adapters.list()) - set(existing)
            for adapter_id in registered:
                hardened.engine.adapters.remove(adapter_id)

    check()


# -- adapter files ----------------------------------------------------------------------------------
# adapter_config.json fields and tensor names, fuzzed one at a time in an otherwise valid LoRA,
# through load_adapter_dir directly (many examples, no server) and through uploads (a few, the
# server's answer and its temp directories). Never anything but a refusal (AdapterError) or a load.
FILE_SETTINGS = settings(SETTINGS, max_examples=400)
CONFIG_FIELDS = ("peft_type", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "r",
                 "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "init_lora_weights", "bias",
                 "modules_to_save", "fan_in_fan_out", "lora_bias", "layer_replication", "init_r", "target_r",
                 "projection_prng_key", "save_projection", "d_initial", "a_field_from_the_future")  # fmt: skip
REGEXY = st.sampled_from(["(", "[", "(?i)q_proj", ".*", "q_proj", "v_proj", r"\d+", r"model\.layers\.0\..*", "layers",
                          "q_proj|v_proj", r"(?:.|\.|[a-z]|\w)*(?!)", "a{4294967296}", "(?P<idx>x)", "", "LORA", "VERA"])  # fmt: skip
json_scalars = st.one_of(st.none(), st.booleans(), st.sampled_from([*NASTY_INTS, -1, 10**400, -(10**400)]),
                         st.integers(), any_float, st.text(max_size=20), REGEXY)  # fmt: skip
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(REGEXY, st.text(max_size=10)), inner, max_size=4)), max_leaves=12)  # fmt: skip
regex_lists = st.one_of(REGEXY, st.lists(st.one_of(REGEXY, st.text(max_size=8)), max_size=3))
numbers = st.one_of(st.integers(-3, 64), any_float, st.sampled_from([10**400, 1e308, 1e30, -1e30, 0]))
# values that get past the type checks, for the fields where those hide the interesting cases
FIELD_VALUES = {
    "target_modules": regex_lists, "exclude_modules": regex_lists, "layers_pattern": regex_lists,
    "modules_to_save": regex_lists, "layers_to_transform": st.one_of(st.integers(-1, 3), st.lists(st.integers(-1, 3), max_size=3)),
    "rank_pattern": st.dictionaries(st.one_of(REGEXY, st.text(max_size=8)), st.one_of(st.integers(-1, 20), any_float), max_size=3),
    "alpha_pattern": st.dictionaries(st.one_of(REGEXY, st.text(max_size=8)), numbers, max_size=3),
    "r": st.integers(-1, 20), "lora_alpha": numbers, "peft_type": st.sampled_from(["LORA", "VERA", "ADALORA", "lora", ""]),
}  # fmt: skip
DIGITS = st.one_of(st.integers(0, 3).map(str), st.sampled_from(["7" * 5000, "00", "1" * 9, "٣"]),
                   st.text("0123456789", min_size=1, max_size=6000), st.text(max_size=4))  # fmt: skip
MODULE_NAMES = st.builds(
    lambda i, parent, name, suffix: f"base_model.model.model.layers.{i}.{parent}.{name}.{suffix}",
    DIGITS, st.one_of(st.sampled_from(["self_attn", "mlp"]), st.text(max_size=6)),
    st.one_of(st.sampled_from(["q_proj", "v_proj", "down_proj", "embed_tokens"]), st.text(max_size=6)),
    st.one_of(st.sampled_from(["lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_E", "weight"]), st.text(max_size=8)),
)  # fmt: skip
tensor_names = st.one_of(MODULE_NAMES, st.text(max_size=80), st.sampled_from(["", "base_model.vera_A", "__metadata__x"]))


class _TinyView:
    """BaseModelView of the bundled tiny model's shapes, with random dense weights."""

    def __init__(self, kit):
        import json

        import torch

        cfg = json.loads((kit.TINY / "config.json").read_text())
        self.num_layers = cfg["num_hidden_layers"]
        self.shapes = {n: (out, inn) for n, (inn, out) in kit.module_shapes().items()}
        self.gen = torch.Generator().manual_seed(0)

    def module_shape(self, layer: int, name: str) -> tuple[int, int]:
        return self.shapes[name]

    def dense_weight(self, layer: int, name: str):
        import torch

        return torch.randn(self.shapes[name], generator=self.gen) * 0.02


@st.composite
def fuzzed_adapters(draw, kit) -> dict[str, bytes]:
    """The two files of a rank-2 LoRA on q_proj and v_proj with one config field or some
    tensor names replaced by hypothesis' values."""
    import json

    import torch

    config = json.loads(kit.lora_config(2, ("q_proj", "v_proj")))
    tensors = kit.lora_tensors(2, ("q_proj", "v_proj"), seed=3)
    if draw(st.booleans()):
        name = draw(st.sampled_from(CONFIG_FIELDS))
        config[name] = draw(st.one_of(FIELD_VALUES[name], json_values) if name in FIELD_VALUES else json_values)
        if name == "layers_pattern" and draw(st.booleans()):
            config["layers_to_transform"] = [0]
    else:
        names = list(tensors)
        for _ in range(draw(st.integers(1, 2))):
            old = draw(st.sampled_from(names + [None]))  # None: an extra tensor
            value = tensors.pop(old) if old in tensors else torch.zeros(2, 64)
            tensors[draw(tensor_names)] = value
    try:
        config_bytes = json.dumps(config).encode()
    except ValueError:  # an int past json's digit limit: the file holds it, as a hand-written one could
        config_bytes = json.dumps({k: v for k, v in config.items() if k != "r"}).encode()[:-1] + b', "r": ' + b"9" * 5000 + b"}"
    return {"adapter_config.json": config_bytes, "adapter_model.safetensors": raw_safetensors(*layout(tensors))}  # by hand: any name (even "") goes in


@pytest.fixture(scope="module")
def tiny_view(kit):
    return _TinyView(kit)


def test_fuzzed_adapter_files_load_or_are_refused(kit, tiny_view, tmp_path_factory):
    import torch

    from loraplex.adapters.errors import AdapterError
    from loraplex.adapters.loader import load_adapter_dir

    root = tmp_path_factory.mktemp("fuzzed")
    count = iter(range(10**9))

    @FILE_SETTINGS
    @given(files=fuzzed_adapters(kit))
    def check(files):
        d = kit.write_adapter(root / str(next(count)), files["adapter_config.json"], files["adapter_model.safetensors"])
        try:
            load_adapter_dir(d, tiny_view, max_rank=kit.MAX_RANK, dtype=torch.bfloat16)
        except AdapterError:
            pass  # anything else fails the test

    check()


def test_fuzzed_adapter_uploads(hardened, kit, wire, untouched):
    header = lambda i: admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(adapter_id=f"fz-file-{i}"))  # noqa: E731
    count = iter(range(10**9))

    @settings(SETTINGS, max_examples=25)
    @given(files=fuzzed_adapters(kit))
    def check(files):
        i = next(count)
        parts = [header(i).SerializeToString()] + [
            admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(filename=name, data=data)).SerializeToString()
            for name, data in files.items()
        ]
        code = wire.upload(parts)
        assert code in ADMIN_CODES - {grpc.StatusCode.ALREADY_EXISTS}, code
        if code == grpc.StatusCode.OK:  # a fuzzed value the server serves: undo
            assert wire.admin("UnloadAdapter", admin_pb2.UnloadAdapterRequest(adapter_id=f"fz-file-{i}", delete_files=True).SerializeToString()) == grpc.StatusCode.OK
        hardened.wait_no_leftovers()

    check()
