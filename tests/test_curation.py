"""megasail.curation pieces alone: caption filters, the hash split, the prompt bank, image sources, the
committed writer, and the batched generation layer's retries (no model; fast)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter

import pytest
from chat_utils import png_bytes

from megasail.curation.filters import FILTER_REASONS, FilterConfig, filter_reason, max_ngram_count
from megasail.curation.prompts import PromptBank, PromptBankError, load_prompt_bank
from megasail.curation.sources import JsonlSource, SourceError, open_source
from megasail.curation.split import shard_of
from megasail.curation.writer import OutputWriter, read_done_ids, truncate_to_committed

GOOD = "A brown dog runs across a green field while two children watch from a wooden bench."


# -- filters ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,tokens,stopped,reason",
    [
        (GOOD, 20, True, None),
        ("   \n ", 2, True, "empty"),
        ("The cat is on the mat. " * 5, 40, True, "repetition"),
        ("猫在垫子上。" * 5, 40, True, "repetition"),  # CJK: characters are words
        ("I'm sorry, but I can't help with identifying people in this image.", 20, True, "refusal"),
        ("I\u2019m sorry, I cannot see the image clearly enough.", 20, True, "refusal"),
        (GOOD, 256, False, "truncated"),
        ("A dog.", 3, True, "too_short"),
        (GOOD, 300, True, "too_long"),
    ],
)
def test_each_filter_names_its_reason(text, tokens, stopped, reason):
    """One caption per filter gets that filter's reason, a good caption none.

    Fault caught: each filter turned off in turn (planted: filter_reason skipping the check -> that
    row's caption kept), and a looping CJK caption missed (planted: plain whitespace words -> one
    'word', no repeated 4-gram)."""
    config = FilterConfig(min_tokens=5, max_tokens=200)
    assert filter_reason(text, tokens, stopped, config) == reason


def test_filter_order_and_prompt_bounds():
    """A looping caption that also hit --max-new-tokens is counted as repetition (the more telling
    reason); a prompt's own bounds replace the run's.

    Fault caught: truncation checked before repetition (planted: order swapped -> 'truncated')."""
    config = FilterConfig(min_tokens=5, max_tokens=None)
    assert filter_reason("on the left " * 20, 256, False, config) == "repetition"
    assert filter_reason(GOOD, 80, True, config) is None
    assert filter_reason(GOOD, 80, True, config, max_tokens=64) == "too_long"
    assert filter_reason("Two dogs.", 3, True, config, min_tokens=2) is None
    assert list(FILTER_REASONS)[:2] == ["empty", "repetition"]


def test_repeated_ngram_threshold():
    """Three occurrences of a 4-gram are tolerated, a fourth is a loop (--max-ngram-repeats 3)."""
    config = FilterConfig(min_tokens=1)
    three = "a red car here, " * 3 + "and more"
    assert max_ngram_count(three, 4) == 3 and filter_reason(three, 20, True, config) is None
    assert filter_reason("a red car here, " * 4, 20, True, config) == "repetition"


# -- split --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_hash_split_covers_every_id_once_in_any_order(tmp_path, dp):
    """Listing a JSONL source per rank at DP=1, 2, 3 gives every id to exactly one rank, and the same
    ranks when the lines come in another order.

    Fault caught: a split by position (planted: shard = line number % dp -> the shuffled file puts
    ids on other ranks)."""
    ids = [f"img-{i}" for i in range(300)]

    def shards(order):
        path = tmp_path / f"list{dp}-{order[0]}.jsonl"
        path.write_text("".join(json.dumps({"id": i, "image": f"{i}.png"}) + "\n" for i in order))
        source = open_source(str(path))
        return [sorted(i for i, _ in source.ids(lambda x, r=r: shard_of(x, dp) == r)) for r in range(dp)]

    first = shards(ids)
    shuffled = ids[:]
    random.Random(dp).shuffle(shuffled)
    assert shards(shuffled) == first
    assert sorted(i for shard in first for i in shard) == sorted(ids)
    if dp > 1:
        assert min(len(s) for s in first) > 300 / dp * 0.7  # no rank starves


# -- prompts ------------------------------------------------------------------------------------------


def test_prompt_choice_is_stable_per_id_and_follows_weights(tmp_path):
    """The prompt of an id does not depend on which other ids were asked before or on the bank
    object; over 6000 ids each prompt's share is its weight; another seed changes choices.

    Fault caught: weights ignored (planted: index = draw * len(prompts) -> shares 1/3 each), and a
    choice from a shared random stream (planted: random.random() -> another prompt per call order)."""
    bank_file = tmp_path / "bank.yaml"
    bank_file.write_text(
        "- {id: long, text: Describe the image in detail., weight: 6}\n"
        "- {id: ocr, text: Read all text in the image., weight: 3}\n"
        "- {id: short, text: One short caption., weight: 1, max_tokens: 40}\n"
    )
    ids = [f"shard-{i // 100}/{i}.jpg" for i in range(6000)]
    bank = load_prompt_bank(str(bank_file), seed=3)
    chosen = {i: bank.choose(i).id for i in ids}
    again = load_prompt_bank(str(bank_file), seed=3)
    assert {i: again.choose(i).id for i in reversed(ids)} == chosen
    shares = Counter(chosen.values())
    for name, weight in (("long", 0.6), ("ocr", 0.3), ("short", 0.1)):
        assert abs(shares[name] / len(ids) - weight) < 0.03, shares
    other = load_prompt_bank(str(bank_file), seed=4)
    assert sum(other.choose(i).id != chosen[i] for i in ids) > 1000
    assert bank.by_id("short").max_tokens == 40


@pytest.mark.parametrize(
    "text,message",
    [
        ("- {id: a, text: x, weight: 0}\n", "'weight' must be a number > 0"),
        ("- {id: a, text: x}\n- {id: a, text: y}\n", "'a' appears more than once"),
        ("- {id: a, txt: x}\n", "unknown key(s) ['txt']"),
        ("{id: a}\n", "expected a list"),
    ],
)
def test_prompt_bank_errors_name_the_entry(tmp_path, text, message):
    path = tmp_path / "bank.yaml"
    path.write_text(text)
    with pytest.raises(PromptBankError, match=None) as error:
        load_prompt_bank(str(path))
    assert message in str(error.value) and str(path) in str(error.value)


def test_default_bank_has_the_three_prompts():
    bank = load_prompt_bank(None)
    assert [p.id for p in bank.prompts] == ["detailed", "ocr", "short"]
    assert "text" in bank.by_id("ocr").text.lower()
    assert isinstance(bank, PromptBank)


# -- sources ------------------------------------------------------------------------------------------


def _all(source):
    return {r.id: r for r in source.records(lambda _: True)}


def test_directory_source_is_recursive_with_relative_ids(tmp_path):
    """ids are paths relative to the directory, subfolders included, non-images skipped; a file read
    later than listed (gone) is an image_missing read error.

    Fault caught: ids as absolute paths (planted: id = full path -> the split changes when the data
    moves, and preprocessing refuses absolute image paths)."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "top.png").write_bytes(png_bytes(8, 8))
    (tmp_path / "a" / "b" / "deep.JPG").write_bytes(png_bytes(8, 8, seed=1))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    records = _all(open_source(str(tmp_path)))
    assert sorted(records) == ["a/b/deep.JPG", "top.png"]
    assert records["a/b/deep.JPG"].image == "a/b/deep.JPG"
    assert records["top.png"].read() == png_bytes(8, 8)
    (tmp_path / "top.png").unlink()
    from megasail.inference.batched import ImageReadError

    with pytest.raises(ImageReadError) as error:
        records["top.png"].read()
    assert error.value.reason == "image_missing"


def test_jsonl_source_carries_fields_and_reports_broken_lines(tmp_path):
    """Other fields ride along (a source "caption" as source_caption), ids come from "id" or the image
    path, and a broken line or one without an image is a record with an error, not a skip.

    Fault caught: carried fields dropped, or the source's alt-text overwriting the new caption
    (planted: no source_ rename -> 'caption' carried as is)."""
    lines = [json.dumps({"id": 7, "image": "x.png", "caption": "alt", "url": "u"}),
             json.dumps({"image": "sub/y.png", "width": 3}), "{oops", json.dumps({"id": "z"})]  # fmt: skip
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records = _all(open_source(str(path)))
    assert records["7"].carried == {"source_caption": "alt", "url": "u"} and records["7"].image == "x.png"
    assert records["sub/y.png"].carried == {"width": 3}
    assert records["in.jsonl:3"].error[0] == "malformed_record" and "in.jsonl:3" in records["in.jsonl:3"].error[1]
    assert records["z"].error[0] == "malformed_record" and "no 'image'" in records["z"].error[1]
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(SourceError, match="--image-root"):  # image paths relative to which file's folder?
        JsonlSource([str(path), str(other / "b.jsonl")], None)


def _tar(path, members, gzip=False):
    with tarfile.open(path, "w:gz" if gzip else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_source_streams_members_by_key(tmp_path):
    """Webdataset shards (plain and gzip, which only a stream can read in order) give one record per
    key with an image: id SHARD#KEY, image SHARD#MEMBER, the .json fields and .txt carried; a key
    without an image and a shard cut mid-member are reported as records with an error.

    Fault caught: unwanted keys' members read anyway (planted: want() ignored -> records of other
    ranks' ids appear), and a broken shard silently ending the listing (planted: the
    archive_corrupt record not yielded)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "000.tar", [("k1.jpg", png_bytes(8, 8)), ("k1.json", b'{"url": "u1", "caption": "alt"}'),
                              ("k2.png", png_bytes(9, 9)), ("k2.txt", b"alt two"), ("k3.json", b"{}")])  # fmt: skip
    _tar(shards / "001.tar.gz", [("d/k4.webp", png_bytes(7, 7)), ("d/k4.cls", b"3")], gzip=True)
    good = (shards / "000.tar").read_bytes()
    (shards / "002.tar").write_bytes(good[:2600])  # cut inside k2.png (its data starts at byte 2560)
    records = _all(open_source(str(shards / "*.tar*")))
    assert records["000.tar#k1"].image == "000.tar#k1.jpg"
    assert records["000.tar#k1"].carried == {"url": "u1", "source_caption": "alt"}
    assert records["000.tar#k1"].read() == png_bytes(8, 8)
    assert records["000.tar#k2"].carried == {"source_caption": "alt two"}
    assert records["000.tar#k3"].error[0] == "image_missing"
    assert records["001.tar.gz#d/k4"].read() == png_bytes(7, 7)
    assert any(r.error and r.error[0] == "archive_corrupt" for k, r in records.items() if k.startswith("002.tar"))
    only = {r.id for r in open_source(str(shards / "*.tar*")).records(lambda i: i == "000.tar#k2")}
    assert only == {"000.tar#k2"}
    listed = {i for i, _ in open_source(str(shards / "*.tar*")).ids(lambda _: True)}
    assert {"000.tar#k1", "000.tar#k2", "000.tar#k3", "001.tar.gz#d/k4"} <= listed


# -- writer -------------------------------------------------------------------------------------------


def test_uncommitted_lines_are_dropped_and_never_counted_done(tmp_path):
    """Lines written after the last commit (a kill between write and commit) are not done ids, and
    truncate_to_committed removes them, torn last line included.

    Fault caught: done ids read from whole files (planted: read past the committed size -> 'b' done
    although never committed, so it would be lost)."""
    writer = OutputWriter(str(tmp_path), 0, fsync=False)
    writer.commit({"captions": [{"id": "a", "caption": "x"}], "filtered": [], "rejects": []}, Counter(kept=1))
    writer.files["captions"].write(b'{"id": "b", "caption": "y"}\n{"id": "c", "cap')
    writer.close()
    assert read_done_ids(str(tmp_path)) == {"a"}
    assert truncate_to_committed(str(tmp_path)) > 0
    assert (tmp_path / "captions-00000.jsonl").read_text() == '{"id": "a", "caption": "x"}\n'
    again = OutputWriter(str(tmp_path), 0, fsync=False)
    assert again.counts == Counter(kept=1)  # a resumed writer continues its counts
    again.close()


# -- preprocessing reads SHARD.tar#MEMBER ---------------------------------------------------------------


def test_preprocessing_reads_tar_members_by_name(tmp_path):
    """read_image_file opens SHARD.tar#MEMBER inside an uncompressed shard; a missing member, a
    compressed shard and a shard outside the root are refused with their reasons.

    Fault caught: the member looked up by the wrong offset (planted: offset of the header instead of
    the data -> other bytes returned)."""
    from megasail.data.preprocess.records import read_image_file
    from megasail.data.preprocess.rejects import RecordRejected

    (tmp_path / "s").mkdir()
    _tar(tmp_path / "s" / "a.tar", [("k1.png", png_bytes(8, 8)), ("d/k2.png", png_bytes(9, 9))])
    _tar(tmp_path / "s" / "b.tar.gz", [("k1.png", png_bytes(8, 8))], gzip=True)
    assert read_image_file(str(tmp_path), "s/a.tar#d/k2.png", 1 << 20, "root") == png_bytes(9, 9)
    assert read_image_file(str(tmp_path / "s"), "a.tar#k1.png", 1 << 20, "root") == png_bytes(8, 8)
    for name, reason in (("s/a.tar#k9.png", "image_missing"), ("s/b.tar.gz#k1.png", "image_unreadable"),
                         ("s/a.tar#k1.png", "image_too_large")):  # fmt: skip
        with pytest.raises(RecordRejected) as error:
            read_image_file(str(tmp_path), name, 100 if reason == "image_too_large" else 1 << 20, "root")
        assert error.value.reason == reason, name
    with pytest.raises(RecordRejected) as error:
        read_image_file(str(tmp_path / "s" / "sub"), "../a.tar#k1.png", 1 << 20, "root")
    assert error.value.reason == "image_path_outside_root"
