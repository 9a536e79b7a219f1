"""The demo models build, load in onnxruntime on CPU, and treat dim 0 as a batch dim."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from inferd import demo_models
from inferd.demo_models import (
    build_cnn,
    build_demo_repository,
    build_echo_bytes,
    build_mlp,
    build_text_encoder,
    write_model,
)

MODEL_NAMES = ["mlp", "cnn", "text_encoder", "echo_bytes"]


def _session(
    tmp_path: Path, name: str, build: Callable[[], onnx.ModelProto]
) -> ort.InferenceSession:
    path = write_model(build(), tmp_path, name)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _assert_rows_match_batch(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], output: str
) -> np.ndarray:
    """Running each row alone must equal that row of the batched run: dim 0 is a batch dim."""
    batched: np.ndarray = session.run([output], feeds)[0]
    rows = next(iter(feeds.values())).shape[0]
    assert batched.shape[0] == rows
    for i in range(rows):
        (single,) = session.run([output], {k: v[i : i + 1] for k, v in feeds.items()})
        assert single.shape == (1, *batched.shape[1:])
        if batched.dtype == object:
            assert single[0] == batched[i]
        else:
            np.testing.assert_allclose(single[0], batched[i], rtol=1e-5, atol=1e-5)
    return batched


def test_repository_layout(tmp_path: Path) -> None:
    assert build_demo_repository(tmp_path) == MODEL_NAMES
    for name in MODEL_NAMES:
        assert (tmp_path / name / "1" / "model.onnx").is_file()
    assert (tmp_path / "mlp" / "config.toml").read_text().splitlines()[1:] == [
        "max_batch_size = 64",
        "max_queue_delay_us = 200",
        "max_queue_size = 1024",
        "instances = 1",
    ]
    assert "max_batch_size = 32" in (tmp_path / "cnn" / "config.toml").read_text()
    assert not (tmp_path / "text_encoder" / "config.toml").exists()
    assert not (tmp_path / "echo_bytes" / "config.toml").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_build_is_deterministic_and_ir10(tmp_path: Path) -> None:
    build_demo_repository(tmp_path / "a")
    build_demo_repository(tmp_path / "b")
    for name in MODEL_NAMES:
        files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / name).rglob("*"))
        assert files
        for rel in files:
            a, b = tmp_path / "a" / rel, tmp_path / "b" / rel
            if a.is_file():
                assert a.read_bytes() == b.read_bytes(), rel
        model = onnx.load(str(tmp_path / "a" / name / "1" / "model.onnx"))
        assert model.ir_version == 10
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
        for value in [*model.graph.input, *model.graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_write_model_versions_and_config(tmp_path: Path) -> None:
    path = write_model(
        build_echo_bytes(), tmp_path, "extra", version=3, config_toml="instances = 2\n"
    )
    assert path == tmp_path / "extra" / "3" / "model.onnx"
    assert (tmp_path / "extra" / "config.toml").read_text() == "instances = 2\n"
    assert onnx.load(str(path)).graph.name == "echo_bytes"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_write_model_rejects_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        write_model(build_echo_bytes(), tmp_path, name)


def test_write_model_rejects_bad_version(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_model(build_echo_bytes(), tmp_path, "m", version=0)


@pytest.mark.parametrize("batch", [1, 5])
def test_mlp(tmp_path: Path, batch: int) -> None:
    session = _session(tmp_path, "mlp", build_mlp)
    x = np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)
    probs = _assert_rows_match_batch(session, {"input": x}, "probabilities")
    assert probs.shape == (batch, 10)
    assert probs.dtype == np.float32
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 5])
def test_cnn(tmp_path: Path, batch: int) -> None:
    session = _session(tmp_path, "cnn", build_cnn)
    x = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype(np.float32)
    logits = _assert_rows_match_batch(session, {"image": x}, "logits")
    assert logits.shape == (batch, 100)
    assert logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    assert np.ptp(logits[0]) > 1e-3
    if batch > 1:
        assert np.ptp(logits, axis=0).max() > 1e-3


def _text_feeds(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 1000, size=(batch, seq), dtype=np.int64)
    lengths = rng.integers(1, seq + 1, size=batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(("batch", "seq"), [(1, 7), (5, 7), (1, 16), (5, 16)])
def test_text_encoder(tmp_path: Path, batch: int, seq: int) -> None:
    session = _session(tmp_path, "text_encoder", build_text_encoder)
    feeds = _text_feeds(batch, seq, seed=batch * 100 + seq)
    embedding = _assert_rows_match_batch(session, feeds, "embedding")
    assert embedding.shape == (batch, 128)
    assert embedding.dtype == np.float32
    assert np.all(np.abs(embedding) <= 1.0)
    assert np.ptp(embedding[0]) > 1e-3

    mask = feeds["attention_mask"]
    other_ids = np.where(mask == 0, (feeds["input_ids"] + 1) % 1000, feeds["input_ids"])
    (changed,) = session.run(["embedding"], {"input_ids": other_ids, "attention_mask": mask})
    np.testing.assert_allclose(changed, embedding, rtol=1e-6, atol=1e-6)

    # Padding to a longer sequence with masked positions leaves the embedding unchanged too.
    pad = np.zeros((batch, 3), dtype=np.int64)
    padded = {
        "input_ids": np.concatenate([feeds["input_ids"], pad + 5], axis=1),
        "attention_mask": np.concatenate([mask, pad], axis=1),
    }
    (longer,) = session.run(["embedding"], padded)
    np.testing.assert_allclose(longer, embedding, rtol=1e-5, atol=1e-6)


def test_text_encoder_unmasked_ids_matter(tmp_path: Path) -> None:
    session = _session(tmp_path, "text_encoder", build_text_encoder)
    feeds = _text_feeds(1, 8, seed=7)
    feeds["attention_mask"][:] = 1
    (a,) = session.run(["embedding"], feeds)
    feeds["input_ids"][0, 0] = (feeds["input_ids"][0, 0] + 1) % 1000
    (b,) = session.run(["embedding"], feeds)
    assert np.abs(a - b).max() > 1e-4


def test_text_encoder_empty_mask_is_finite(tmp_path: Path) -> None:
    session = _session(tmp_path, "text_encoder", build_text_encoder)
    feeds = _text_feeds(2, 4, seed=3)
    feeds["attention_mask"][:] = 0
    (embedding,) = session.run(["embedding"], feeds)
    assert np.all(np.isfinite(embedding))


# ORT string tensors: the input must be a numpy array of Python str (dtype=object or "<U").
# ORT UTF-8-encodes each element via str(), so bytes objects are NOT decoded: b"ab" arrives as
# the text "b'ab'"; a fixed-width bytes array (dtype "S") yields garbage. Outputs always come
# back as dtype=object arrays of str (UTF-8-decoded; a non-UTF-8 string raises
# UnicodeDecodeError). Bytes must therefore be decoded to str before run() and re-encoded after.
@pytest.mark.parametrize("batch", [1, 5])
def test_echo_bytes(tmp_path: Path, batch: int) -> None:
    session = _session(tmp_path, "echo_bytes", build_echo_bytes)
    raw = [f"row {i}: héllo".encode() for i in range(batch)]
    text = np.array([b.decode("utf-8") for b in raw], dtype=object)
    echo = _assert_rows_match_batch(session, {"text": text}, "echo")
    assert echo.shape == (batch,)
    assert echo.dtype == object
    assert all(isinstance(s, str) for s in echo)
    assert [s.encode("utf-8") for s in echo] == raw


def test_echo_bytes_does_not_decode_bytes_objects(tmp_path: Path) -> None:
    session = _session(tmp_path, "echo_bytes", build_echo_bytes)
    (echo,) = session.run(["echo"], {"text": np.array([b"ab"], dtype=object)})
    assert echo.tolist() == ["b'ab'"]


def test_main_prints_one_line_per_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo_models.main(["--out", str(tmp_path / "repo")])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == MODEL_NAMES
    assert (tmp_path / "repo" / "cnn" / "1" / "model.onnx").is_file()
