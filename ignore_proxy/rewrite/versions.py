"""``GET /_matrix/client/versions``."""

from __future__ import annotations

from .raw import Raw, encode_object, render, split_object, top_object

__all__ = ["MSC4406_FEATURE", "add_msc4406_feature"]

MSC4406_FEATURE = "uk.timedout.msc4406"
_TRUE = b"true"


def add_msc4406_feature(body: bytes) -> bytes:
    """``unstable_features`` with ``"uk.timedout.msc4406": true`` (created if absent).

    The body comes back unchanged if the flag is already true or ``unstable_features``
    is not an object. InvalidBody if the body is not a JSON object.
    """
    top = top_object(body)
    features_raw = top.get("unstable_features")
    if features_raw is None:
        features: dict[str, Raw] = {}
    else:
        parsed = split_object(features_raw)
        if parsed is None:
            return body
        features = parsed
    current = features.get(MSC4406_FEATURE)
    if current is not None and bytes(memoryview(current)).strip() == _TRUE:
        return body
    features[MSC4406_FEATURE] = Raw(_TRUE)
    top["unstable_features"] = encode_object(features)
    return render(top)
