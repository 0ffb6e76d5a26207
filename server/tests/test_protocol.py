"""The Slicer client's copy of the protocol (``MedSAMSlicerLib/protocol.py``) against the server's source.

The copy is loaded by path (it is standard library only and imports no package), and every public
UPPERCASE name it defines must equal the server's value of that name. Names for the panel only
(``*_LABELS``, display names keyed by a server name list) must cover exactly the server's names.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from medsam_server import intensity, models, protocol

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CLIENT_PROTOCOL = os.path.join(REPO, "MedSAMSlicer", "MedSAMSlicerLib", "protocol.py")
#: Where the server keeps the names that do not live in its protocol module.
SERVER_SOURCES = (protocol, models, intensity)


def _load_by_path(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def _client_protocol():
    # No skip: the copy ships with the module, so a missing file is a failure, not a parity check left out.
    assert os.path.isfile(CLIENT_PROTOCOL), f"{CLIENT_PROTOCOL} is missing (the Slicer client's copy of the protocol)"
    return _load_by_path("medsam_client_protocol_copy", CLIENT_PROTOCOL)


def _server_value(name: str):
    for source in SERVER_SOURCES:
        if hasattr(source, name):
            return getattr(source, name)
    raise KeyError(name)


def test_every_constant_the_client_copies_equals_the_servers():
    client = _client_protocol()
    names = [n for n in vars(client) if n.isupper() and not n.startswith("_")]
    assert "API_VERSION" in names and "MAGIC" in names  # it really is the protocol copy
    for name in names:
        value = getattr(client, name)
        if name.endswith("_LABELS"):
            listed = _server_value(name[: -len("_LABELS")] + "_NAMES")
            assert set(value) == set(listed), f"{name} names {sorted(value)}, the server {sorted(listed)}"
            continue
        try:
            expected = _server_value(name)
        except KeyError:
            pytest.fail(f"the client's protocol defines {name}, which the server does not")
        assert value == expected, f"{name}: client {value!r}, server {expected!r}"


def test_the_server_protocol_module_loads_no_package_either():
    """protocol.py is standard library only, so it can be copied into Slicer as it is."""
    alone = _load_by_path("medsam_server_protocol_alone", protocol.__file__)
    assert alone.API_VERSION == protocol.API_VERSION and alone.ROUTE_JOB == protocol.ROUTE_JOB
