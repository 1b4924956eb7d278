"""What a device is told of its refused message: the ref and the code, nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd import payload
from tests.unit.helpers import FAST

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
CLAIMS = st.dictionaries(st.sampled_from(["v", "device", "seq", "ts", "id", "to", "type",
                                          "body", "secret"]), JSON | st.uuids().map(str))


class TestDeviceError:
    @FAST
    @given(claims=CLAIMS, code=st.sampled_from(sorted(payload.DEVICE_ERROR_CODES)))
    def test_only_the_ref_and_the_code(self, claims: dict[str, Any], code: str) -> None:
        """Whatever the refused payload holds, the error carries its id (a canonical UUID
        or null) and the code, and `from` is a business id or empty: no other input."""
        sender, body = payload.device_error(claims, code)
        assert body.keys() == {"ref", "code"}
        assert body["code"] == code
        assert body["ref"] is None or body["ref"] == str(claims["id"]).lower()
        assert sender == "" or (sender == claims["to"]
                                and payload.BUSINESS_ID.fullmatch(sender))

    def test_replayed_is_never_told(self) -> None:
        """A replay's first copy was passed on: there is no error code for it."""
        assert "replayed" not in payload.DEVICE_ERROR_CODES
        with pytest.raises(AssertionError):
            payload.device_error({}, "replayed")
