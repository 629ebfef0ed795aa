"""Coverage-guided fuzzing (atheris, libFuzzer) of everything that parses bytes from the
network: secagg messages, connection frames, a received bundle and its manifest. The first
byte picks the decoder. The invariant: accept, or raise the decoder's documented error; any
other exception is a crash and fails the run.

    python tests/fuzz_decoders.py CORPUS_DIR -max_total_time=60
(`tests/test_fuzzing.py` writes a seed corpus and runs it for a bounded time.)
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from fedcart.model_export.bundle import BundleError, Manifest, unpack_members, verify_members
    from fedcart.protocol import channel
    from fedcart.secagg.errors import MalformedMessage
    from fedcart.secagg.messages import decode

KEY = bytes(32)  # verification fails on a real signature check, after parsing


def one_input(data: bytes) -> None:
    if not data:
        return
    target, rest = data[0] % 4, data[1:]
    try:
        if target == 0:
            decode(rest)
        elif target == 1:
            channel.parse(rest)
        elif target == 2:
            Manifest.from_json(rest)
        else:
            verify_members(unpack_members(rest), KEY)
    except (MalformedMessage, BundleError):
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
