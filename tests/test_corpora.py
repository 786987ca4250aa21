"""Named real-text corpora (issue 18): the standard library's sources, split by file, hashed, and a run that
trains on one records it and refuses to resume on other text."""

import json

import pytest

from linglab import corpora
from linglab.cli import main
from linglab.corpora import is_heldout, load_corpus, stdlib_files, stdlib_root


def test_the_stdlib_corpus_is_the_interpreters_sources_without_tests():
    files = stdlib_files(stdlib_root())
    names = {relative for relative, _ in files}
    assert "os.py" in names and "json/decoder.py" in names
    assert not any(part in ("test", "tests", "site-packages") for name in names for part in name.split("/")[:-1])


@pytest.fixture
def small_stdlib(tmp_path, monkeypatch):
    """A stand-in library of 60 files, so tests do not read 12 MB."""
    root = tmp_path / "lib"
    for i in range(60):
        path = root / ("pkg" if i % 3 else "") / f"mod{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'"""Module {i}."""\n\n\ndef f{i}(x):\n    return x * {i} + {i % 7}\n' * 20)
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text("assert True\n")
    (root / "latin.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    monkeypatch.setattr(corpora, "stdlib_root", lambda: root)
    return root


def test_split_by_file_hash_and_recorded(small_stdlib):
    corpus = load_corpus("stdlib", heldout_percent=20)
    info = corpus.info
    assert info["files"] == 60 and info["skipped_non_utf8"] == 1  # the test dir and the latin-1 file left out
    heldout = [rel for rel, _ in stdlib_files(small_stdlib) if is_heldout(rel, 20) and rel != "latin.py"]
    assert info["heldout_files"] == len(corpus.heldout) == len(heldout) > 0 and len(corpus.train) == 60 - len(heldout)
    assert load_corpus("stdlib", heldout_percent=20).info["sha256"] == info["sha256"]
    (small_stdlib / "mod0.py").write_text("changed = True\n")
    assert load_corpus("stdlib", heldout_percent=20).info["sha256"] != info["sha256"]
    with pytest.raises(Exception, match="unknown corpus 'wiki'"):
        load_corpus("wiki")


def test_train_on_a_corpus_records_it_and_resume_refuses_other_text(small_stdlib, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data.corpus=stdlib", "--data.seq_len=64", "--data.heldout_tokens=256",
            "--train.batch_size=4", "--train.max_steps=2", "--train.eval_every=0", "--train.num_samples=0",
            "--out", str(out)]
    assert main(args) == 0
    recorded = json.loads((out / "corpus.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["corpus"] == recorded and recorded["name"] == "stdlib"
    final = json.loads((out / "final_eval.json").read_text())
    assert final["heldout_loss"] > 0 and final["tiers"] == {}
    (small_stdlib / "mod1.py").write_text("other = 1\n")
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume"]) == 2
    assert "is not the text this run started on" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--data.corpus=stdlib", "--data.path=x.txt", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "exclusive" in capsys.readouterr().err and not (tmp_path / "bad").exists()
