"""/v1/classify decodes an uploaded multi-frame DICOM by the frame rule its model's data was imported with."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.serve.uploads import RequestRefused, decode_upload


def _body(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name)).read_bytes()


def test_a_stack_model_gets_the_stacked_slices_and_a_middle_model_the_middle_frame():
    body = _body("eCT_Supplemental.dcm")  # enhanced CT, 2 frames
    stacked, kind = decode_upload(body, size=16, channels=2, frames="stack:2")
    assert kind == "dicom" and stacked.shape == (2, 16, 16)
    middle, _ = decode_upload(body, size=16, channels=3)  # grey middle frame into an RGB model
    assert middle.shape == (3, 16, 16) and (middle[0] == middle[2]).all()
    assert not (stacked[0] == stacked[1]).all()  # two different slices, not one repeated


def test_a_single_frame_upload_to_a_stack_model_is_refused_with_the_reason():
    with pytest.raises(RequestRefused) as caught:
        decode_upload(_body("CT_small.dcm"), size=16, channels=3, frames="stack:3")
    assert caught.value.status == 400
    assert caught.value.code == "bad_dicom"
    assert caught.value.message.startswith("the image has 1 frame; --frames stack:3 needs multi-frame images")
