"""The signed bundle: a round trip, and a clear refusal of every kind of bad bundle."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import nacl.signing
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcart.model_export.bundle import (
    GRAPH_FILES,
    INFLATE_FLOOR,
    MANIFEST,
    MAX_INFLATE_RATIO,
    PAYLOAD_FILES,
    SIGNATURE,
    BundleError,
    pack_members,
    read_bundle,
    unpack_members,
    verify_members,
    vocabulary_digest,
)
from fedcart.model_export.export import export_bundle
from fedcart.model_export.model import Neighbours, init_weights
from fedcart.model_export.runtime import Recommender

ITEMS = [f"sku{i:02d}" for i in range(20)]
NAMES = [f"Product {i}" for i in range(20)]
KEY = nacl.signing.SigningKey(bytes(range(32)))
PUBLIC = bytes(KEY.verify_key)
TABLE = Neighbours(np.random.default_rng(1).integers(0, len(ITEMS), (len(ITEMS), 3)),
                   np.random.default_rng(2).random((len(ITEMS), 3)).astype(np.float32))


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "v3"
    weights = init_weights(len(ITEMS), 4, np.random.default_rng(0))
    export_bundle(out, weights, ITEMS, NAMES, KEY, neighbours=TABLE, model_version=3,
                  round_id=7, history_decay=0.9)
    return out


@pytest.fixture
def copy(original: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(original, tmp_path / "bundle"))


def test_round_trip(original: Path) -> None:
    bundle = read_bundle(original, PUBLIC, vocabulary_sha256=vocabulary_digest(ITEMS),
                         min_model_version=3)
    m = bundle.manifest
    assert (m.model_version, m.round, m.n_items, m.dim, m.neighbours) == (3, 7, 20, 4, 3)
    assert bundle.items == tuple(ITEMS) and bundle.names == tuple(NAMES)
    expected = init_weights(len(ITEMS), 4, np.random.default_rng(0))
    np.testing.assert_array_equal(bundle.weights().e_in, expected.e_in)
    np.testing.assert_array_equal(bundle.neighbours().ids, TABLE.ids)
    np.testing.assert_array_equal(bundle.neighbours().weights, TABLE.weights)
    ids, _ = Recommender(bundle.files["recommend.ort"], bundle.weights(),
                         bundle.neighbours()).top_k([[0, 1]], 3)
    assert ids.shape == (1, 3)


def test_a_signed_table_pointing_outside_the_catalog_is_refused(original: Path,
                                                                tmp_path: Path) -> None:
    """Even under a valid signature (a server bug, not an attacker): an id past V would
    index outside the model's arrays."""
    bundle = read_bundle(original, PUBLIC)
    bad = bytearray(bundle.files["neighbours.bin"])
    rows = int.from_bytes(bad[0:4], "little")
    first_id = 4 + 4 * rows  # after the row count and the row ids
    bad[first_id:first_id + 4] = (len(ITEMS)).to_bytes(4, "little")  # an id of V
    manifest = json.loads(bundle.manifest_json)
    manifest["files"]["neighbours.bin"] = hashlib.sha256(bad).hexdigest()
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    members = {**bundle.members(), "neighbours.bin": bytes(bad), MANIFEST: raw,
               SIGNATURE: KEY.sign(raw).signature}
    with pytest.raises(BundleError, match=r"neighbours\.bin is malformed"):
        verify_members(members, PUBLIC)


def test_a_new_version_differs_only_in_manifest_and_weights(original: Path,
                                                            tmp_path: Path) -> None:
    """What lets a device download 4 bytes per parameter per model version."""
    first = read_bundle(original, PUBLIC)
    weights = init_weights(len(ITEMS), 4, np.random.default_rng(5))
    export_bundle(tmp_path / "v4", weights, ITEMS, NAMES, KEY, neighbours=first.neighbours(),
                  model_version=4, history_decay=0.9,
                  graphs={n: first.files[n] for n in GRAPH_FILES})
    second = read_bundle(tmp_path / "v4", PUBLIC)
    changed = {n for n in (MANIFEST, SIGNATURE, *PAYLOAD_FILES)
               if first.members()[n] != second.members()[n]}
    assert changed == {MANIFEST, SIGNATURE, "weights.bin"}


def test_packed_members_verify_and_a_partial_set_is_refused(original: Path) -> None:
    bundle = read_bundle(original, PUBLIC)
    packed = pack_members(bundle.members())
    assert verify_members(unpack_members(packed), PUBLIC).weights().flat().tobytes() == \
        bundle.weights().flat().tobytes()
    partial = unpack_members(pack_members(bundle.members(without=GRAPH_FILES)))
    with pytest.raises(BundleError, match="missing"):
        verify_members(partial, PUBLIC)
    with pytest.raises(BundleError, match="cannot read"):
        unpack_members(packed[: len(packed) // 2])


def test_zip_round_trip(original: Path, tmp_path: Path) -> None:
    packed = tmp_path / "b.zip"
    packed.write_bytes(pack_members(read_bundle(original, PUBLIC).members()))
    assert read_bundle(packed, PUBLIC).manifest.model_version == 3


def test_never_overwrites(original: Path) -> None:
    weights = init_weights(len(ITEMS), 4, np.random.default_rng(1))
    with pytest.raises(FileExistsError):
        export_bundle(original, weights, ITEMS, NAMES, KEY)


def test_unsigned(copy: Path) -> None:
    (copy / SIGNATURE).unlink()
    with pytest.raises(BundleError, match="unsigned"):
        read_bundle(copy, PUBLIC)


def test_wrong_key(copy: Path) -> None:
    other = bytes(nacl.signing.SigningKey.generate().verify_key)
    with pytest.raises(BundleError, match="signature does not verify"):
        read_bundle(copy, other)


def test_tampered_manifest(copy: Path) -> None:
    body = json.loads((copy / MANIFEST).read_bytes())
    body["model_version"] = 99
    (copy / MANIFEST).write_bytes(json.dumps(body).encode())
    with pytest.raises(BundleError, match="signature does not verify"):
        read_bundle(copy, PUBLIC)


@pytest.mark.parametrize("name", PAYLOAD_FILES)
def test_tampered_file(copy: Path, name: str) -> None:
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name} is tampered or truncated"):
        read_bundle(copy, PUBLIC)


def test_truncated(copy: Path) -> None:
    (copy / "weights.bin").write_bytes((copy / "weights.bin").read_bytes()[:-4])
    with pytest.raises(BundleError, match="tampered or truncated"):
        read_bundle(copy, PUBLIC)
    (copy / "train_step.ort").unlink()
    with pytest.raises(BundleError, match=r"train_step\.ort is missing"):
        read_bundle(copy, PUBLIC)


def test_truncated_zip(original: Path, tmp_path: Path) -> None:
    packed = tmp_path / "b.zip"
    whole = pack_members(read_bundle(original, PUBLIC).members())
    packed.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BundleError):
        read_bundle(packed, PUBLIC)


def test_wrong_vocabulary_and_downgrade(original: Path) -> None:
    with pytest.raises(BundleError, match="another item vocabulary"):
        read_bundle(original, PUBLIC, vocabulary_sha256=vocabulary_digest(ITEMS[::-1]))
    with pytest.raises(BundleError, match="downgrade refused"):
        read_bundle(original, PUBLIC, min_model_version=4)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a bundle"):
        read_bundle(tmp_path, PUBLIC)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"junk")
    with pytest.raises(BundleError, match="neither a bundle directory nor a zip"):
        read_bundle(junk, PUBLIC)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_flipped_byte_is_refused(original: Path, tmp_path_factory, data) -> None:
    name = data.draw(st.sampled_from([MANIFEST, SIGNATURE, *PAYLOAD_FILES]))
    raw = bytearray((original / name).read_bytes())
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= data.draw(st.integers(1, 255))
    target = Path(shutil.copytree(original, tmp_path_factory.mktemp("flip") / "b"))
    (target / name).write_bytes(bytes(raw))
    with pytest.raises(BundleError):
        read_bundle(target, PUBLIC)


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED,
         folder: str = "") -> bytes:
    """``members`` zipped with ``compression``, under ``folder`` (with its directory entry,
    as `zip -r` writes it) when given."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
        if folder:
            zf.writestr(zipfile.ZipInfo(f"{folder}/"), b"")
        for name, data in members.items():
            zf.writestr(f"{folder}/{name}" if folder else name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("encrypted, compression", [(True, zipfile.ZIP_STORED),
                                                    (False, zipfile.ZIP_BZIP2)])
def test_encrypted_or_bzip2_members_are_refused(original: Path, encrypted: bool,
                                                compression: int) -> None:
    """An 'encrypted' member made zipfile raise RuntimeError (found by the atheris harness);
    a method other than stored or deflated is not a bundle's: both are BundleError."""
    raw = bytearray(_zip(read_bundle(original, PUBLIC).members(), compression))
    if encrypted:  # set bit 0 of the flags in every local and central header
        for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = raw.find(signature)
            while at >= 0:
                raw[at + offset] |= 0x1
                at = raw.find(signature, at + 4)
    with pytest.raises(BundleError, match=r"cannot read|compressed with zip method 12"):
        unpack_members(bytes(raw))


def test_a_bundle_without_embeddings_round_trips_and_its_size_is_checked(
        tmp_path: Path) -> None:
    """d = 0: weights.bin holds the bias and blend only (V + 4 float32), the bundle
    verifies and recommends, and a weights.bin of another d is refused under its manifest."""
    weights = init_weights(len(ITEMS), 0, np.random.default_rng(0),
                           popularity=np.arange(len(ITEMS)))
    export_bundle(tmp_path / "d0", weights, ITEMS, NAMES, KEY, neighbours=TABLE,
                  model_version=1, history_decay=0.9)
    bundle = read_bundle(tmp_path / "d0", PUBLIC, vocabulary_sha256=vocabulary_digest(ITEMS))
    assert bundle.manifest.dim == 0
    assert len(bundle.files["weights.bin"]) == 4 * (len(ITEMS) + 4)
    back = bundle.weights()
    assert back.e_in.shape == back.e_out.shape == (len(ITEMS), 0)
    np.testing.assert_array_equal(back.bias, weights.bias)
    np.testing.assert_array_equal(back.blend, weights.blend)
    ids, _ = Recommender(bundle.files["recommend.ort"], back, bundle.neighbours()).top_k(
        [[0, 1]], 3)
    # no history, the table's term aside, the bias (log-popularity) ranks the catalog
    expected = np.argsort(-(np.log1p(np.arange(len(ITEMS)))
                            + back.blend[3] * TABLE.scores(np.array([[0, 1]]))[0]
                            - np.isin(np.arange(len(ITEMS)), [0, 1]) * 1e9))[:3]
    np.testing.assert_array_equal(ids[0], expected)

    def signed(**changes: object) -> dict[str, bytes]:
        manifest = {**json.loads(bundle.manifest_json), **changes}
        raw = json.dumps(manifest, separators=(",", ":")).encode()
        return {**bundle.members(), MANIFEST: raw, SIGNATURE: KEY.sign(raw).signature}

    with pytest.raises(BundleError, match=r"weights\.bin holds"):
        verify_members(signed(dim=1), PUBLIC)
    with pytest.raises(BundleError, match="d must be at least 0"):
        verify_members(signed(dim=-1), PUBLIC)


def test_a_zip_of_the_bundle_folder_is_read_deflated(original: Path, tmp_path: Path) -> None:
    """What `zip -r model.zip v3/` makes: the files under one folder, deflated; and what
    macOS's Finder adds (__MACOSX/) beside it is ignored."""
    members = read_bundle(original, PUBLIC).members()
    packed = tmp_path / "model.zip"
    packed.write_bytes(_zip(members, zipfile.ZIP_DEFLATED, folder="v3"))
    with zipfile.ZipFile(packed, "a") as zf:
        zf.writestr("__MACOSX/v3/._manifest.json", b"resource fork")
    assert {i.compress_type for i in zipfile.ZipFile(packed).infolist()
            if i.filename.startswith("v3/") and i.file_size} == {zipfile.ZIP_DEFLATED}
    bundle = read_bundle(packed, PUBLIC)
    assert bundle.members() == members
    assert bundle.manifest.model_version == 3


def test_files_in_two_folders_are_not_a_bundle(original: Path) -> None:
    members = read_bundle(original, PUBLIC).members()
    raw = io.BytesIO(_zip(members, folder="a"))
    with zipfile.ZipFile(raw, "a") as zf:
        zf.writestr("b/README", b"another folder")
    with pytest.raises(BundleError, match=r"no manifest\.json: not a bundle"):
        verify_members(unpack_members(raw.getvalue()), PUBLIC)


def test_a_zip_bomb_is_refused_before_it_inflates(original: Path) -> None:
    """8 MiB of zeros deflate to 8 KB: over MAX_INFLATE_RATIO, refused from its header."""
    members = read_bundle(original, PUBLIC).members()
    bomb = _zip({**members, "weights.bin": bytes(8 << 20)}, zipfile.ZIP_DEFLATED)
    assert len(bomb) < (8 << 20) // MAX_INFLATE_RATIO
    with pytest.raises(BundleError, match=r"weights\.bin would inflate from \d+ to 8388608 "
                                          r"bytes.*zip bomb"):
        unpack_members(bomb)
    # under the floor, a member may deflate as well as it does: a small vocabulary, say
    small = _zip({**members, "weights.bin": bytes(INFLATE_FLOOR)}, zipfile.ZIP_DEFLATED)
    assert len(unpack_members(small)["weights.bin"]) == INFLATE_FLOOR


def test_a_header_understating_the_inflated_size_is_refused(original: Path) -> None:
    """The read stops at the size the header declares and checks the CRC: a member that
    inflates to more than it says is cut there and refused, never read on."""
    members = read_bundle(original, PUBLIC).members()
    raw = bytearray(_zip({**members, "weights.bin": bytes(256 << 10)}, zipfile.ZIP_DEFLATED))
    central = raw.find(b"PK\x01\x02")  # the central directory's entry for weights.bin
    while raw[central + 46:central + 46 + len(b"weights.bin")] != b"weights.bin":
        central = raw.find(b"PK\x01\x02", central + 4)
    raw[central + 24:central + 28] = (100).to_bytes(4, "little")  # uncompressed size
    with pytest.raises(BundleError, match=r"cannot read the bundle \(Bad CRC-32"):
        unpack_members(bytes(raw))


def test_a_member_with_an_empty_name_is_not_a_bundle() -> None:
    """zipfile's ZipInfo.is_dir fails on an empty name (found by the atheris harness)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(zipfile.ZipInfo(""), b"nameless")
    assert unpack_members(buffer.getvalue()) == {}
