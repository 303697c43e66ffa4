"""The OpenAI-compatible API against a real `airlock serve` process: chat, completions, streaming,
stop sequences, seeds, usage counts, models, metrics and classification of PNG, JPEG and DICOM."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from tests.appliance.serve.conftest import MARKER
from tests.conftest import files_holding

QUESTION = f"The compressor C2 of line {MARKER} shows intermittent stop. What should I check first?"


def _client(server, key: str = "client", appliance=None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {appliance.keys[key]}"} if appliance else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


def _stream_events(response: httpx.Response) -> list[dict | str]:
    """The server-sent events of a response: parsed JSON objects, and the final '[DONE]'."""
    events: list[dict | str] = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat_completion_uses_the_chat_template_and_counts_tokens(server, appliance):
    from transformers import AutoTokenizer

    from tests.conftest import REPO

    messages = [{"role": "system", "content": "You are a maintenance assistant."},
                {"role": "user", "content": QUESTION}]
    with _client(server, appliance=appliance) as client:
        response = client.post("/v1/chat/completions", json={"model": "qa", "messages": messages, "max_tokens": 12,
                                                              "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.headers["X-Airlock-Model"] == "qa@v1"
    assert response.headers["X-Airlock-Backend"] == "pytorch"
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "qa"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    tokenizer = AutoTokenizer.from_pretrained(REPO / "models" / "tiny-deepseek-r1", local_files_only=True)
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(expected)
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streamed_chat_joins_to_the_same_text_as_the_unstreamed_one(server, appliance):
    request = {"model": "qa", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24,
               "temperature": 0.9, "top_p": 0.95, "seed": 1234, "ignore_eos": True}
    with _client(server, appliance=appliance) as client:
        plain = client.post("/v1/chat/completions", json=request).json()
        again = client.post("/v1/chat/completions", json=request).json()
        with client.stream("POST", "/v1/chat/completions",
                           json={**request, "stream": True, "stream_options": {"include_usage": True}}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["X-Airlock-Model"] == "qa@v1"
            events = _stream_events(response)
    message = plain["choices"][0]["message"]
    text, reasoning = message["content"], message["reasoning_content"]  # an R1 template: reasoning apart
    assert again["choices"][0]["message"] == message  # the same seed gives the same tokens
    assert plain["usage"]["completion_tokens"] == 24 and plain["choices"][0]["finish_reason"] == "length"
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks) == reasoning
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"] == plain["usage"]


def test_completion_stops_at_a_stop_sequence_streamed_or_not(server, appliance):
    base = {"model": "qa", "prompt": f"Maintenance log {MARKER}. Machine: press line 2.", "max_tokens": 16,
            "temperature": 0, "ignore_eos": True}
    with _client(server, appliance=appliance) as client:
        full = client.post("/v1/completions", json=base).json()
        text = full["choices"][0]["text"]
        assert full["object"] == "text_completion" and full["usage"]["completion_tokens"] == 16
        stop = text.strip()[len(text.strip()) // 2:][:3]  # three characters from the middle of the greedy text
        assert stop.strip(), text
        expected = text[:text.index(stop)]
        stopped = client.post("/v1/completions", json={**base, "stop": [stop, "never-seen-xyz"]}).json()
        with client.stream("POST", "/v1/completions", json={**base, "stop": stop, "stream": True}) as response:
            events = _stream_events(response)
    assert stopped["choices"][0]["text"] == expected
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] < 16
    pieces = [e["choices"][0]["text"] for e in events[:-1]]
    assert "".join(pieces) == expected and events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_openai_python_client_against_the_server(server, appliance):
    openai = pytest.importorskip("openai", reason="the `openai` package is not installed in this venv; add "
                                                  "openai to the dev extra to run the client-compatibility test")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=appliance.keys["client"])
    chat = client.chat.completions.create(model="qa", messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    streamed = client.chat.completions.create(model="qa", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=8, temperature=0, stream=True)
    chunks = [chunk.choices[0].delta for chunk in streamed if chunk.choices]
    assert "".join(d.content or "" for d in chunks) == chat.choices[0].message.content
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in chunks) == \
        chat.choices[0].message.reasoning_content
    completion = client.completions.create(model="qa", prompt="Maintenance log.", max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list()] == ["qa", "xray"]


def test_models_health_and_metrics(server, appliance):
    with _client(server, appliance=appliance) as client:
        # A chat of this test's own: the counters below must not depend on another test having asked first.
        chat = client.post("/v1/chat/completions", json={"model": "qa", "max_tokens": 4, "temperature": 0,
                                                          "messages": [{"role": "user", "content": QUESTION}]})
        assert chat.status_code == 200, chat.text
        health = httpx.get(f"{server.url}/healthz", timeout=10)
        assert health.status_code == 200 and health.json() == {"status": "ok", "models": 2}
        models = client.get("/v1/models").json()
        metrics = client.get("/metrics")
    listed = {m["id"]: m["airlock"] for m in models["data"]}
    assert listed["qa"]["version"] == "v1" and listed["qa"]["run"] == appliance.runs["qa1"]
    # Neither was optimized: PyTorch serves them, and the server says why.
    assert listed["qa"]["backend_reason"].startswith("PyTorch because TensorRT engine: no engine was built")
    assert "ONNX Runtime CPU: no ONNX export of this model" in listed["xray"].pop("backend_reason")
    assert listed["xray"] == {"version": appliance.runs["xray"], "kind": "classifier", "backend": "pytorch",
                              "base_model": "tiny-resnet-cls", "run": appliance.runs["xray"],
                              "labels": ["disc", "square"]}
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'airlock_model_info{model="qa",version="v1",backend="pytorch",kind="lm"} 1' in text
    assert 'airlock_requests_total{endpoint="chat_completions",status="200"}' in text
    assert 'airlock_request_duration_seconds_bucket{endpoint="chat_completions",le="+Inf"}' in text
    completion_tokens = [line for line in text.splitlines()
                         if line.startswith('airlock_tokens_total{model="qa",type="completion"}')]
    assert completion_tokens and int(completion_tokens[0].split()[-1]) > 0


def _png(disc: bool, fmt: str = "PNG") -> bytes:
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[:48, :48]
    shape = (yy - 24) ** 2 + (xx - 24) ** 2 <= 100 if disc else (abs(yy - 24) <= 9) & (abs(xx - 24) <= 9)
    buffer = io.BytesIO()
    Image.fromarray((shape * 200).astype(np.uint8), "L").save(buffer, format=fmt)
    return buffer.getvalue()


def make_dicom(rows: int = 40, cols: int = 40) -> bytes:
    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName = f"Doe^{MARKER}"
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CT", rows, cols, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "MONOCHROME2", 16, 12, 11
    ds.PixelRepresentation = 0
    yy, xx = np.mgrid[:rows, :cols]
    ds.PixelData = (((yy - rows // 2) ** 2 + (xx - cols // 2) ** 2 <= 81) * 3000).astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def test_classify_png_jpeg_and_dicom_in_memory(server, appliance):
    with _client(server, appliance=appliance) as client:
        answers = {kind: client.post("/v1/classify", params={"model": "xray"}, content=data)
                   for kind, data in (("png", _png(True)), ("jpeg", _png(False, "JPEG")), ("dicom", make_dicom()))}
        implicit = client.post("/v1/classify", content=_png(True))  # the only classifier: no model needed
    for kind, response in answers.items():
        assert response.status_code == 200, response.text
        assert response.headers["X-Airlock-Model"] == f"xray@{appliance.runs['xray']}"
        body = response.json()
        assert body["input"] == kind and body["version"] == appliance.runs["xray"] and body["backend"] == "pytorch"
        assert sorted(p["label"] for p in body["predictions"]) == ["disc", "square"]
        assert sum(p["probability"] for p in body["predictions"]) == pytest.approx(1.0, abs=1e-5)
        assert body["label"] == body["predictions"][0]["label"]
    assert implicit.status_code == 200 and implicit.json()["predictions"] == answers["png"].json()["predictions"]
    # Nothing of an upload is stored: no file under the appliance home holds the DICOM's patient name.
    assert files_holding(appliance.home, MARKER.encode()) == []
