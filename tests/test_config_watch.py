"""config/watch.py on real files: a kubelet ConfigMap swap, an edit in place (seen half-way), a
rename over the file, a file that goes away. Oracle: when FileWatch.changed() says yes."""

from __future__ import annotations

import os
from pathlib import Path

from agent.config.watch import FileWatch
from tests.kubelet import ConfigMapVolume


def looks(watch: FileWatch, n: int) -> list[bool]:
    return [watch.changed() for _ in range(n)]


def test_a_kubelet_swap_of_data_is_reported_once_at_the_second_look(tmp_path: Path) -> None:
    volume = ConfigMapVolume(tmp_path / "vol")
    volume.write({"config.yaml": "a: 1\n"})
    watch = FileWatch(volume.root / "config.yaml")
    assert looks(watch, 3) == [False, False, False]
    link_inode = os.lstat(volume.root / "config.yaml").st_ino
    volume.write({"config.yaml": "a: 2\n"})
    assert os.lstat(volume.root / "config.yaml").st_ino == link_inode  # the path never changed
    assert looks(watch, 4) == [False, True, False, False]


def test_a_swap_to_identical_content_is_still_a_new_file(tmp_path: Path) -> None:
    # the kubelet swaps only when the projection changed (another key, say): a reload of an
    # equal config changes nothing in the daemon, so reporting it is harmless
    volume = ConfigMapVolume(tmp_path / "vol")
    volume.write({"config.yaml": "a: 1\n"})
    watch = FileWatch(volume.root / "config.yaml")
    volume.write({"config.yaml": "a: 1\n", "other": "x"})
    assert looks(watch, 3) == [False, True, False]


def test_an_edit_in_place_is_reported_once_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("product_code: x\n")
    watch = FileWatch(path)
    with path.open("a") as f:  # an editor half-way through its write
        f.write("dimensions:\n")
        f.flush()
        assert watch.changed() is False
        f.write("  - name: a\n")
    assert watch.changed() is False  # changed again since the last look: not settled yet
    assert looks(watch, 3) == [True, False, False]


def test_a_file_renamed_over_the_path_and_one_removed(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    watch = FileWatch(path)
    new = tmp_path / "config.yaml.new"
    new.write_text("a: 1\n")  # the same bytes, another file: dpkg's and editors' way
    os.replace(new, path)
    assert looks(watch, 3) == [False, True, False]
    path.unlink()  # reported: the reload then fails and says so, the running config is kept
    assert looks(watch, 3) == [False, True, False]
    path.write_text("a: 1\n")
    assert looks(watch, 2) == [False, True]
