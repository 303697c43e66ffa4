"""The DICOM decoders of the appliance stack: pinned in the appliance extra (so in every bundle and
its SBOM), available to pydicom here, decoding what they claim, and named when one is missing."""

from __future__ import annotations

import tomllib

import pytest

from appliance.data.dicom_pixels import MISSING_DECODER, decode_dicom_pixels
from appliance.data.errors import FileRejected
from tests.conftest import REPO

# The pydicom plugins the appliance ships (docs/adr/0014-dicom-decoders.md).
DECODER_PACKAGES = ("pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls")
DECODED_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "JPEG Baseline", "1.2.840.10008.1.2.4.51": "JPEG Extended (12-bit)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless", "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless", "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless", "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless", "1.2.840.10008.1.2.4.202": "HTJ2K RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K", "1.2.840.10008.1.2.5": "RLE Lossless",
}


def test_every_decoder_is_pinned_in_the_appliance_extra_and_available_for_each_syntax():
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["appliance"]
    pins = dict(p.split("==", 1) for p in extra)
    assert all(pins.get(name) for name in DECODER_PACKAGES), [n for n in DECODER_PACKAGES if n not in pins]
    from importlib.metadata import version

    assert {name: version(name) for name in DECODER_PACKAGES} == {name: pins[name] for name in DECODER_PACKAGES}
    from pydicom.pixels import get_decoder

    unavailable = [name for uid, name in DECODED_SYNTAXES.items() if not get_decoder(uid).is_available]
    assert not unavailable


def test_12_bit_jpeg_extended_decodes_to_12_bit_values():
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import pixel_array

    ds = pydicom.dcmread(get_testdata_file("JPGExtended.dcm"))
    raw = pixel_array(ds)
    # Values above 255: the 12-bit samples are decoded, not cut to 8 bits (this image's maximum is 264).
    assert ds.BitsStored == 12 and raw.dtype == np.uint16 and 255 < int(raw.max()) < 4096
    pixels = decode_dicom_pixels(ds, 64)
    assert pixels.shape == (1, 64, 64) and float(pixels.min()) < 0.05 and float(pixels.max()) > 0.3  # 0.002, 0.67


def test_a_plugin_missing_from_the_install_is_named_with_what_to_do():
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import get_decoder

    ds = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    removed = list(decoder.available_plugins)
    for label in removed:  # as if the bundle had been built without them
        decoder.remove_plugin(label)
    try:
        with pytest.raises(FileRejected) as caught:
            decode_dicom_pixels(ds, 16)
    finally:
        for label in removed:
            decoder.add_plugin(label, (f"pydicom.pixels.decoders.{label}", "_decode_frame"))
    assert decoder.available_plugins == tuple(sorted(removed))
    assert caught.value.reason == (f"JPEG-LS pixel data {MISSING_DECODER}: JPEG-LS needs pyjpegls or "
                                   "pylibjpeg-libjpeg in the bundle; reinstall the appliance from a bundle built "
                                   "with the 'appliance' extra")
    assert decode_dicom_pixels(ds, 16).shape == (1, 16, 16)  # and back
