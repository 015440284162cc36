"""Unit tests of worker.storage: atomic writes, path safety, file names."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from models.errors import PermanentError, StorageError, TransientError, UnsafePath
from worker.storage import LocalStorage, safe_file_name


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty storage root inside the test's temporary folder."""
    folder = tmp_path / "documents"
    folder.mkdir()
    return folder


@pytest.fixture
def storage(root: Path) -> LocalStorage:
    """Local storage on the empty root."""
    return LocalStorage(root)


def _tree(folder: Path) -> list[str]:
    """Every file and folder under ``folder``, hidden ones included, sorted."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


# -- writes -----------------------------------------------------------------


def test_write_stores_the_bytes_and_returns_size_and_sha256(
    storage: LocalStorage, root: Path
) -> None:
    """A write puts the exact bytes on disk and reports their size and sha256."""
    data = "# Charter\nÉquipe: Ana\n".encode()

    stored = storage.write("jobs/7/charter.md", data)

    assert (root / "jobs" / "7" / "charter.md").read_bytes() == data
    assert stored.file_name == "charter.md"
    assert stored.file_path == "jobs/7/charter.md"
    assert stored.file_size == len(data) == 23
    assert stored.sha256 == hashlib.sha256(data).hexdigest()


def test_write_leaves_no_temporary_file(storage: LocalStorage, root: Path) -> None:
    """After a write the folder holds the document and nothing else."""
    storage.write("jobs/1/a.md", b"one")
    storage.write("jobs/1/b.md", b"two")

    assert _tree(root) == ["jobs", "jobs/1", "jobs/1/a.md", "jobs/1/b.md"]


def test_write_replaces_an_existing_document(storage: LocalStorage, root: Path) -> None:
    """Writing the same path again replaces the file's whole content."""
    storage.write("doc.md", b"a much longer first version")

    stored = storage.write("doc.md", b"short")

    assert (root / "doc.md").read_bytes() == b"short"
    assert stored.file_size == 5
    assert _tree(root) == ["doc.md"]


def test_write_of_empty_data_creates_an_empty_file(
    storage: LocalStorage, root: Path
) -> None:
    """Empty data is a valid document of size 0 with the empty sha256."""
    stored = storage.write("empty.md", b"")

    assert (root / "empty.md").read_bytes() == b""
    assert stored.file_size == 0
    assert stored.sha256 == hashlib.sha256(b"").hexdigest()


def test_write_under_a_file_raises_storage_error_and_leaves_nothing(
    storage: LocalStorage, root: Path
) -> None:
    """A file where the folder should be fails the write with a retryable error."""
    (root / "jobs").write_bytes(b"not a folder")

    with pytest.raises(StorageError) as caught:
        storage.write("jobs/1/doc.md", b"data")

    assert isinstance(caught.value, TransientError)
    assert "cannot write jobs/1/doc.md" in str(caught.value)
    assert (root / "jobs").read_bytes() == b"not a folder"
    assert _tree(root) == ["jobs"]


def test_write_onto_a_folder_raises_storage_error_and_removes_the_temp_file(
    storage: LocalStorage, root: Path
) -> None:
    """A rename that fails after the data was written leaves no temporary file."""
    (root / "report.md").mkdir()
    (root / "report.md" / "keep.txt").write_bytes(b"keep")

    with pytest.raises(StorageError) as caught:
        storage.write("report.md", b"data")

    assert "cannot write report.md" in str(caught.value)
    assert _tree(root) == ["report.md", "report.md/keep.txt"]


def test_write_with_a_name_too_long_raises_storage_error(
    storage: LocalStorage, root: Path
) -> None:
    """A file name the file system refuses is a StorageError, not an OSError."""
    name = "n" * 300 + ".md"

    with pytest.raises(StorageError) as caught:
        storage.write(name, b"data")

    assert "too long" in str(caught.value)
    assert _tree(root) == []


# -- unsafe paths -----------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "../escape.md",
        "jobs/../../escape.md",
        "jobs/..",
        "/etc/passwd",
        "//etc/passwd",
        "jobs\\..\\escape.md",
        "..\\escape.md",
        "jobs/a\x00b.md",
        "",
        ".",
        "./",
    ],
)
def test_unsafe_path_is_refused_naming_it(
    storage: LocalStorage, root: Path, path: str
) -> None:
    """Paths that are empty, absolute, climb, use backslashes or NUL are refused."""
    with pytest.raises(UnsafePath) as caught:
        storage.write(path, b"data")

    assert isinstance(caught.value, PermanentError)
    assert repr(path) in str(caught.value)
    assert _tree(root) == []
    assert not (root.parent / "escape.md").exists()


def test_symlinked_folder_pointing_outside_the_root_is_refused(
    storage: LocalStorage, root: Path, tmp_path: Path
) -> None:
    """A symlink inside the root to a folder outside it cannot be written through."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)

    with pytest.raises(UnsafePath) as caught:
        storage.write("link/doc.md", b"data")

    assert "'link/doc.md'" in str(caught.value)
    assert list(outside.iterdir()) == []


def test_symlinked_file_pointing_outside_the_root_is_refused(
    storage: LocalStorage, root: Path, tmp_path: Path
) -> None:
    """A symlink inside the root to a file outside it is neither written nor read."""
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"secret")
    (root / "doc.md").symlink_to(outside)

    with pytest.raises(UnsafePath):
        storage.write("doc.md", b"data")
    with pytest.raises(UnsafePath):
        storage.exists("doc.md")
    with pytest.raises(UnsafePath):
        storage.remove("doc.md")

    assert outside.read_bytes() == b"secret"


def test_symlink_staying_inside_the_root_is_allowed(
    storage: LocalStorage, root: Path
) -> None:
    """A symlinked folder that stays under the root can be written through."""
    (root / "real").mkdir()
    (root / "alias").symlink_to(root / "real", target_is_directory=True)

    storage.write("alias/doc.md", b"data")

    assert (root / "real" / "doc.md").read_bytes() == b"data"


def test_resolve_returns_the_path_under_the_root(
    storage: LocalStorage, root: Path
) -> None:
    """A safe relative path resolves to the same path under the root."""
    assert storage.resolve("jobs/3/doc.md") == root.resolve() / "jobs" / "3" / "doc.md"


# -- exists, remove, remove_tree --------------------------------------------


def test_exists_is_true_only_for_a_written_file(storage: LocalStorage) -> None:
    """exists is false before a write, true after it, and false for a folder."""
    assert not storage.exists("jobs/1/doc.md")

    storage.write("jobs/1/doc.md", b"data")

    assert storage.exists("jobs/1/doc.md")
    assert not storage.exists("jobs/1")


def test_remove_deletes_the_file_and_ignores_a_missing_one(
    storage: LocalStorage, root: Path
) -> None:
    """remove deletes a document; removing it again is not an error."""
    storage.write("jobs/1/doc.md", b"data")

    storage.remove("jobs/1/doc.md")
    storage.remove("jobs/1/doc.md")

    assert not storage.exists("jobs/1/doc.md")
    assert _tree(root) == ["jobs", "jobs/1"]


def test_remove_of_a_folder_raises_storage_error(
    storage: LocalStorage, root: Path
) -> None:
    """remove on a folder fails with StorageError naming the path."""
    (root / "jobs").mkdir()

    with pytest.raises(StorageError) as caught:
        storage.remove("jobs")

    assert "cannot remove jobs" in str(caught.value)


def test_remove_and_exists_refuse_unsafe_paths(storage: LocalStorage) -> None:
    """remove and exists check the path like write does."""
    with pytest.raises(UnsafePath):
        storage.remove("../doc.md")
    with pytest.raises(UnsafePath):
        storage.exists("/etc/passwd")


def test_remove_tree_deletes_a_folder_and_ignores_a_missing_one(
    storage: LocalStorage, root: Path
) -> None:
    """remove_tree deletes a folder with its files; a missing folder is fine."""
    storage.write("jobs/1/a.md", b"a")
    storage.write("jobs/1/sub/b.md", b"b")
    storage.write("jobs/2/c.md", b"c")

    storage.remove_tree("jobs/1")
    storage.remove_tree("jobs/1")

    assert _tree(root) == ["jobs", "jobs/2", "jobs/2/c.md"]


@pytest.mark.parametrize("path", ["", ".", "..", "jobs/../..", "/"])
def test_remove_tree_refuses_the_root_and_paths_outside_it(
    storage: LocalStorage, root: Path, path: str
) -> None:
    """remove_tree can never delete the root itself or anything outside it."""
    storage.write("doc.md", b"data")

    with pytest.raises(UnsafePath):
        storage.remove_tree(path)

    assert _tree(root) == ["doc.md"]


def test_remove_tree_refuses_a_symlink_pointing_outside(
    storage: LocalStorage, root: Path, tmp_path: Path
) -> None:
    """remove_tree through a symlink to an outside folder deletes nothing there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(b"keep")
    (root / "link").symlink_to(outside, target_is_directory=True)

    with pytest.raises(UnsafePath):
        storage.remove_tree("link")

    assert (outside / "keep.txt").read_bytes() == b"keep"


# -- safe_file_name ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("charter.md", "charter.md"),
        ("Project Charter v2.md", "Project-Charter-v2.md"),
        ("../../etc/passwd", "etc-passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        (".hidden", "hidden"),
        ("...dots", "dots"),
        ("a/b\\c", "a-b-c"),
        ("nul\x00byte", "nul-byte"),
        ("", "document"),
        ("...", "document"),
        ("/", "document"),
    ],
)
def test_safe_file_name_strips_separators_and_leading_dots(
    name: str, expected: str
) -> None:
    """User text becomes a name with no separators and no leading dots."""
    assert safe_file_name(name) == expected


def test_safe_file_name_is_at_most_200_characters() -> None:
    """A very long name is cut to 200 characters."""
    assert safe_file_name("x" * 1000) == "x" * 200
