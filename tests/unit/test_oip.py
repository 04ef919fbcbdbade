"""The Open Inference Protocol's translation without a server: the binary tensor layout both ways,
nested JSON tensors read in row-major order, the header split, and errors in the protocol's format
(tests/e2e/test_serve_oip.py holds the server and a real client to the same)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from similarity.api import BadRequest, MethodNotAllowed
from similarity.api.oip import (
    InferenceRequest,
    decode_bytes,
    encode_tensor,
    error_response,
    read_inputs,
    split_binary,
    wanted_outputs,
)


@given(st.lists(st.text(st.characters(exclude_categories=("Cs",))), max_size=20))
def test_bytes_elements_round_trip(values: list[str]) -> None:
    raw = encode_tensor("BYTES", values)
    assert len(raw) == sum(4 + len(v.encode()) for v in values)
    assert decode_bytes(raw, "x", len(values)) == values


def test_fp32_and_bool_layouts() -> None:
    assert np.frombuffer(encode_tensor("FP32", [0.5, None]), dtype="<f4").tolist()[0] == 0.5
    assert np.isnan(np.frombuffer(encode_tensor("FP32", [None]), dtype="<f4")[0])
    assert encode_tensor("BOOL", [True, False]) == b"\x01\x00"
    assert encode_tensor("BYTES", ["ab"]) == struct.pack("<I", 2) + b"ab"


def request(inputs: list[dict]) -> InferenceRequest:
    return InferenceRequest.model_validate({"inputs": inputs})


def test_nested_json_tensors_are_read_row_major() -> None:
    req = request(
        [
            {"name": "caption", "shape": [3], "datatype": "BYTES", "data": [["a", "b"], ["c"]]},
            {"name": "image", "shape": [3], "datatype": "BYTES", "data": ["x", ["y", ["z"]]]},
        ]
    )
    assert read_inputs(req, None) == (["x", "y", "z"], ["a", "b", "c"])


def test_binary_inputs_are_read_in_order() -> None:
    blob = encode_tensor("BYTES", ["u1", "u2"]) + encode_tensor("BYTES", ["c1", "c2"])
    req = request(
        [
            {"name": "image", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 12}},
            {"name": "caption", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 12}},
        ]
    )
    assert read_inputs(req, blob) == (["u1", "u2"], ["c1", "c2"])


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [(b"\x05\x00\x00\x00abc", "element 0 says 5 bytes; 3 follow"), (b"\x01\x00", "ends inside an element's length")],
)
def test_truncated_binary_elements_are_a_400(raw: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        decode_bytes(raw, "image", 1)


def test_the_header_split() -> None:
    assert split_binary(b'{"a": 1}tail', None) == (b'{"a": 1}tail', None)
    assert split_binary(b'{"a": 1}tail', "8") == (b'{"a": 1}', b"tail")
    for bad in ("-1", "1e3", "", "٣"):  # a count in ASCII digits only
        with pytest.raises(BadRequest, match="must be a byte count"):
            split_binary(b"{}", bad)


def test_outputs_default_to_all_and_take_the_binary_flags() -> None:
    one = [{"name": "image", "shape": [0], "datatype": "BYTES", "data": []}]
    req = InferenceRequest.model_validate({"inputs": one, "parameters": {"binary_data_output": True}})
    assert wanted_outputs(req) == [("similarity", True), ("cosine", True), ("error", True), ("truncated", True)]
    req = InferenceRequest.model_validate(
        {"inputs": one, "outputs": [{"name": "error"}, {"name": "cosine", "parameters": {"binary_data": True}}]}
    )
    assert wanted_outputs(req) == [("error", False), ("cosine", True)]


def test_errors_answer_the_protocols_format() -> None:
    r = error_response(BadRequest("request failed validation", fields=[{"field": "inputs.0", "message": "bad"}]))
    assert r.status == 400 and json.loads(r.body) == {"error": "bad_request: request failed validation: inputs.0: bad"}
    r = error_response(MethodNotAllowed("GET is not allowed", ["POST"]))
    assert r.status == 405 and r.headers == {"Allow": "POST"} and list(json.loads(r.body)) == ["error"]
