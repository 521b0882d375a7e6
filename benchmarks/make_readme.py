"""Generate benchmarks/README.md, the index of the benchmark results, from benchmarks/results/.

Every result is a pair written by a benchmark script: `<name>.json`, the record (the command that
made it, per-run values, the machine), and `<name>.md`, the tables the script rendered from that
record. The index files each current result under the question it answers, in the order of
SECTIONS below, with the command taken from the record (from the .md's "Command:" line when the
record has none) and the tables copied from the .md. Results found in results/ but not listed in
SECTIONS appear under "Other results"; superseded results live in results/archive/ and are listed
with the reason in ARCHIVED.

    python benchmarks/make_readme.py           # write benchmarks/README.md
    python benchmarks/make_readme.py --check   # exit 1 when benchmarks/README.md is out of date

The output depends only on the files in results/ and on this script (no dates, no machine
details beyond what the records hold), so `--check` can run in a test.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ARCHIVE = RESULTS / "archive"
README = HERE / "README.md"


@dataclass(frozen=True)
class Entry:
    name: str  # results/<name>.json and .md
    title: str
    about: str  # what the table answers; figures stay in the tables


@dataclass(frozen=True)
class Section:
    anchor: str
    title: str
    intro: str
    entries: tuple[Entry, ...]


SECTIONS: tuple[Section, ...] = (
    Section(
        "reproduction", "Reproducing published numbers",
        "ID-only models trained with the settings their papers publish (the `bsarec` preset, N=50, unless a "
        "table says otherwise), beside the published figures and, where it was run on the same machine, the "
        "reference code. A ratio is given only against a row trained with the same loss and settings. "
        "LastFM has 1,090 test users, so single runs vary by several percent there; Beauty (22,363 test "
        "users) is the stable comparison.",
        (
            Entry("wearec_beauty", "WEARec on Beauty", "WEARec with its published Beauty settings."),
            Entry("bsarec_beauty", "BSARec on Beauty", "BSARec with its published Beauty settings."),
            Entry("fearec_bsarec_beauty", "FEARec (BSARec-code port) on Beauty",
                  "The published FEARec rows were trained with the BSARec code base's port of FEARec "
                  "(`model_args.variant=bsarec`), which this table uses."),
            Entry("sasrec_beauty", "SASRec on Beauty",
                  "SASRec with BCE and one sampled negative (the published setting) and with cross-entropy "
                  "over all items (not compared: the published rows used BCE)."),
            Entry("wearec_lastfm_int16_dropout", "WEARec on LastFM",
                  "WEARec, five seeds, beside the published row and the reference code trained on the same "
                  "machine."),
            Entry("wearec_bsarec_lastfm", "BSARec (and WEARec) on LastFM",
                  "BSARec, three seeds, beside the published row and the reference code. The WEARec row of "
                  "this table was trained before the dropout masks changed to 16-bit uniforms; the WEARec "
                  "table above is the current one."),
            Entry("fearec_bsarec_lastfm", "FEARec (BSARec-code port) on LastFM",
                  "The variant the published row was trained with."),
            Entry("fearec_lastfm", "FEARec (official variant) on LastFM",
                  "The official FEARec configuration; the published row (the BSARec-code port) is shown "
                  "beside it, not compared."),
            Entry("sasrec_lastfm", "SASRec on LastFM", "SASRec with BCE (the published setting) and with CE."),
            Entry("wearec_lastfm_n200_alpha01", "WEARec on LastFM, N=200",
                  "Long sequences at the setting of the WEARec README's N=200 row (alpha 0.1, 2 heads)."),
            Entry("wearec_lastfm_n200", "WEARec on LastFM, N=200 at alpha 0.3",
                  "Long sequences at the N=50 setting, against the reference repository's logged run at "
                  "that setting."),
        ),
    ),
    Section(
        "reference-settings", "Settings that follow the reference code",
        "Switches that reproduce a detail of the reference code bases, and bfloat16 training, each "
        "measured against the default on the same seeds.",
        (
            Entry("wearec_lastfm_copy_first_block_int16_dropout", "WEARec, every layer a copy of the first",
                  "`model_args.copy_first_block=true` (one block built and deep-copied, as the reference "
                  "code does) against the per-layer initialisation of the WEARec LastFM table above."),
            Entry("wearec_lastfm_ce_padding", "WEARec, padding column kept in the cross-entropy",
                  "`model_args.ce_padding=true`, as the BSARec/WEARec code trains, against the default "
                  "(padding left out) in the BSARec/WEARec LastFM table on the same seeds; both were "
                  "trained before the dropout-mask change."),
            Entry("wearec_lastfm_bf16", "WEARec trained in bfloat16",
                  "`--precision bf16` against the fp32 WEARec LastFM table on the same seeds."),
        ),
    ),
    Section(
        "no-published", "Models without published numbers",
        "ASRec publishes no figures; these tables record what it reaches here under the `recbole` preset.",
        (
            Entry("asrec_ml100k_recbole", "ASRec on ml-100k", "One seed, `--precision bf16`."),
            Entry("asrec_lastfm_recbole", "ASRec on LastFM", "One seed, `--precision bf16`."),
        ),
    ),
    Section(
        "athwe", "ATHWE against the ID-only baselines",
        "The multimodal ATHWE model against SASRec, BSARec and WEARec on the same split, with ablations "
        "that switch one ATHWE component off. Several seeds per row; the paired tables compare rows user "
        "by user on the same test users (bootstrap over users), which covers which users are tested, "
        "not training noise beyond the seeds averaged.",
        (
            Entry("athwe_ml100k_content_routing", "ml-100k, ATHWE as configured",
                  "ATHWE with the ml-100k settings of `athwe/configs/athwe.yaml` (ID + text, experts routed "
                  "on the fused content, `time_scale: auto`) against the ID-only baselines, with ablations "
                  "(time routing, no wavelet, no mixture of experts, ID only)."),
            Entry("athwe_ml100k_time_scale_auto", "ml-100k, time-routed ATHWE",
                  "ATHWE with time routing and `time_scale=auto`, against WEARec and against routing on "
                  "content: the validation comparison that chose ml-100k's configuration, plus a bfloat16 "
                  "row."),
            Entry("athwe_demo_time_routing", "Demo, time routing on and off",
                  "On the bundled demo, whose timestamps carry the signal, ATHWE with and without time "
                  "routing, and trained in bfloat16."),
            Entry("athwe_demo_time_routing_packed", "Demo, time routing on and off, encoders on the real items",
                  "The same comparison after the per-modality encoders were changed to compute only the "
                  "real items (same function, other dropout draws), three seeds: quality and peak memory."),
            Entry("athwe_demo_time_routing_windows", "Demo, time routing on and off, windowed attention",
                  "The same comparison after attention, the experts and the wavelet alignment were changed to "
                  "run on the real items only (attention in windows of the columns that hold them; same "
                  "function, other dropout draws), three seeds: quality and peak memory."),
            Entry("athwe_demo_time_scale_auto", "Demo, automatic time scale",
                  "`model_args.time_scale=auto` against the reference time scale (the ATHWE row of the "
                  "time-routing table, same seeds)."),
        ),
    ),
    Section(
        "speed", "Speed",
        "Throughput of training, evaluation and feature extraction. Most were measured on shared 2-core "
        "CPUs: each table records the machine, the thread count and the load, and the ratios measured "
        "side by side in one process carry over between machines better than absolute rates.",
        (
            Entry("train_speed", "Training throughput against an older commit",
                  "Every model's training samples/s on the demo and on ml-100k settings, this tree against an "
                  "older commit in alternating windows at one thread, and beside a single-threaded busy loop "
                  "with the default threads."),
            Entry("train_speed_default_threads", "ATHWE training throughput with the default threads",
                  "The same comparison for ATHWE on the demo with each tree's default thread count on an idle "
                  "2-core machine."),
            Entry("train_speed_bf16", "ATHWE training throughput under bf16 autocast on a CPU without bf16 units",
                  "The same comparison for ATHWE on the demo with --precision bf16 in both trees, on an AVX2 CPU "
                  "that emulates bfloat16 arithmetic (compare with the fp32 table: bf16 only pays on hardware "
                  "with bf16 units)."),
            Entry("model_speed", "Training step of every model",
                  "Steps/s of every model on LastFM batches, with plain re-implementations in the "
                  "reference code's style timed in alternating windows (ref-style rows)."),
            Entry("model_speed_bf16", "Training step, bfloat16 against fp32",
                  "Every model with `--precision bf16` and fp32 in alternating windows on a CPU with AMX."),
            Entry("model_speed_n200", "Training step at N=200", "WEARec, BSARec and SASRec at sequence length 200."),
            Entry("model_speed_fearec_beauty", "FEARec on Beauty batches, freed memory kept",
                  "The default malloc tuning (freed heap memory kept for reuse)."),
            Entry("model_speed_fearec_beauty_glibc_default", "FEARec on Beauty batches, glibc defaults",
                  "The same with `ATHWE_KEEP_FREED_MEMORY=0`, timed beside the previous table."),
            Entry("distributed_speed", "Threads against torchrun processes",
                  "One process with two threads against two data-parallel processes with one thread each."),
            Entry("eval_speed", "Full-ranking evaluation", "A full test pass on Beauty, and SASRec training steps."),
            Entry("extract_speed", "Feature extraction",
                  "Text embedding batched against one item per pass, a sanity check of the features, and "
                  "image-tower throughput."),
        ),
    ),
    Section(
        "serving", "Serving a trained run",
        "Recommendations from a trained run beyond its own users: items that had no interactions when "
        "it was trained, added from their content (`athwe items add`).",
        (
            Entry("cold_start_demo", "Cold start on the demo",
                  "10% of the items held out of training with all their interactions, added to the trained "
                  "ATHWE run from their content, and ranked for the test users whose target is one of "
                  "them: against random and popularity rankings and a model trained with them."),
            Entry("serve_load", "`athwe serve` under load",
                  "1, 4 and 16 concurrent loopback clients for 30 s each against SASRec and ATHWE demo runs "
                  "and a 1M-item IVF-PQ catalogue, with request batching on and off: requests/s, latency "
                  "percentiles, errors and server memory."),
        ),
    ),
    Section(
        "retrieval", "Retrieval",
        "The FAISS index kinds `athwe index` builds, on clustered synthetic item vectors up to one million "
        "items; the figures behind the `--kind auto` default.",
        (
            Entry("retrieval", "Exact, HNSW and IVF-PQ",
                  "Build time, bytes per item, single-user latency, batch throughput and recall@10 against "
                  "the exact index."),
        ),
    ),
)

#: why each result in results/archive/ was set aside
ARCHIVED: dict[str, str] = {
    "athwe_ml100k": "ATHWE at the reference time scale with time routing, a configuration ml-100k no longer "
                    "uses; superseded by athwe_ml100k_time_scale_auto and athwe_ml100k_content_routing, "
                    "which carry its SASRec and BSARec runs.",
    "wearec_lastfm_copy_first_block": "Three seeds trained before the dropout masks changed to 16-bit "
                                      "uniforms; superseded by wearec_lastfm_copy_first_block_int16_dropout.",
}

SCRIPTS = """\
| script | what it measures |
|---|---|
| `reproduce.py` | ID-only models on the shared datasets, test metrics beside the published numbers |
| `athwe_ml100k.py` | ATHWE against SASRec, BSARec and WEARec (ml-100k by default), ablations, paired tests |
| `train_speed.py` | every model's training samples/s, this tree against an older commit, idle and busy |
| `model_speed.py` | training steps/s of every model, optionally beside reference-style implementations or in bf16 |
| `gpu_check.py` | on a CUDA machine (`gpu_check.sh`): steps/s in fp32 and bf16, evaluation, the demo, extraction |
| `eval_speed.py` | full-ranking evaluation time on Beauty and SASRec training throughput |
| `extract_speed.py` | text and image feature extraction throughput, and a check of the text features |
| `distributed_speed.py` | one process with several threads against torchrun processes |
| `retrieval_speed.py` | exact, HNSW and IVF-PQ indexes: build time, memory, latency, recall |
| `cold_start.py` | items held out of training, added to an ATHWE run from their content, ranked for their users |
| `serve_load.py` | `athwe serve` under 1, 4 and 16 concurrent clients: requests/s, latency percentiles, memory |
| `leaderboard.py` | every model tuned on one `athwe tune` budget, retrained with three seeds, paired against ATHWE |
| `make_readme.py` | this index |

The training benchmarks write their run folders under `benchmarks/runs/` (not kept in git: each
table's .json keeps the records of its runs). Started again with the same arguments they reuse
every finished run whose saved config and data match and resume interrupted ones; `--fresh`
trains anew, and `--report-only` trains nothing and tabulates what is there, keeping the records
of runs whose folders are on another machine from the table's earlier .json (their seeds are
marked †). In the tables, a wall time or peak memory marked * comes from a run that was stopped
and resumed. Each .md beside a table explains its columns and footnotes.
"""


def result_names(folder: Path) -> list[str]:
    return sorted(p.name[:-len(".json")] for p in folder.glob("*.json") if not p.name.endswith(".ranks.json"))


def read_record(folder: Path, name: str) -> dict:
    path = folder / f"{name}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path}: cannot read the record ({e})") from None
    if not isinstance(record, dict):
        raise SystemExit(f"error: {path}: expected a JSON object")
    return record


def read_md(folder: Path, name: str) -> str:
    path = folder / f"{name}.md"
    if not path.is_file():
        raise SystemExit(f"error: {path}: missing (every result is a .json record with the .md table beside it)")
    return path.read_text(encoding="utf-8")


def command_of(record: dict, md: str) -> str | None:
    if isinstance(record.get("command"), str):
        return record["command"]
    m = re.search(r"^Command: `([^`]+)`", md, flags=re.MULTILINE)
    return m.group(1) if m else None


def machine_of(record: dict) -> str | None:
    """What the record says about the machine it was measured on, if anything."""
    if isinstance(record.get("machine"), str):
        return record["machine"]
    env = record.get("env") if isinstance(record.get("env"), dict) else record
    parts = []
    for key, label in (("cpu", "CPU"), ("cores", "cores"), ("cpus", "CPUs"), ("device", "device"),
                       ("threads", "threads"), ("torch", "torch"), ("faiss", "faiss")):
        value = env.get(key)
        if value is not None and not isinstance(value, (dict, list)):
            parts.append(f"{label} {value}")
    return ", ".join(parts) if parts else None


def tables_of(md: str) -> list[str]:
    """The tables of a rendered .md, each preceded by the `##` heading it sits under (when it has
    one) and, for a table after the first, by a label: the paragraph just before it when that
    paragraph introduces it (ends with a colon), or what a paired-comparison table is."""
    out: list[str] = []
    heading, shown, block, paragraph = None, None, [], ""
    count = 0

    def flush() -> None:
        nonlocal shown, count
        if not block:
            return
        if heading is not None and heading != shown:
            out.append(f"*{heading}*\n")
            shown = heading
        if count and "| against |" in block[0]:
            out.append("*Paired comparisons on the same test users (NDCG@10, bootstrap over users):*\n")
        elif count and paragraph.endswith(":"):
            out.append(paragraph + "\n")
        out.append("\n".join(block) + "\n")
        block.clear()
        count += 1

    for line in md.splitlines():
        if line.startswith("|"):
            block.append(line.rstrip())
            continue
        flush()
        if line.startswith("## "):
            heading, paragraph = line[3:].strip(), ""
        elif line.strip():
            paragraph = (paragraph + " " + line.strip()).strip() if paragraph else line.strip()
        else:
            paragraph = paragraph if paragraph.endswith(":") else ""  # a blank line ends the paragraph
    flush()
    return out


def archived_paths_note(command: str) -> str | None:
    """A note for tables named in `command` that have since moved to results/archive/."""
    moved = sorted({m for m in re.findall(r"benchmarks/results/([\w.-]+)", command)
                    if not (RESULTS / f"{m}.json").is_file() and (ARCHIVE / f"{m}.json").is_file()})
    if not moved:
        return None
    names = ", ".join(f"`benchmarks/results/{m}`" for m in moved)
    return f"{names} now lives in `benchmarks/results/archive/`; use that path to run the command again."


def render_entry(entry: Entry, folder: Path, link_prefix: str) -> list[str]:
    record, md = read_record(folder, entry.name), read_md(folder, entry.name)
    lines = [f"### {entry.title}", "", entry.about, ""]
    command = command_of(record, md)
    lines += [f"Command: `{command}`" if command else "Command: not recorded.", ""]
    note = archived_paths_note(command) if command else None
    if note:
        lines += [note, ""]
    machine = machine_of(record)
    if machine:
        lines += [f"Machine: {machine}.", ""]
    for table in tables_of(md):
        lines += [table]
    lines += [(f"The table with its notes: [{entry.name}.md]({link_prefix}{entry.name}.md); the record: "
               f"[{entry.name}.json]({link_prefix}{entry.name}.json)."), ""]
    return lines


def render() -> str:
    current = set(result_names(RESULTS))
    archived = set(result_names(ARCHIVE)) if ARCHIVE.is_dir() else set()
    listed = [e.name for s in SECTIONS for e in s.entries]
    dupes = sorted({n for n in listed if listed.count(n) > 1})
    if dupes:
        raise SystemExit(f"error: listed more than once in SECTIONS: {', '.join(dupes)}")
    missing = sorted(set(listed) - current)
    if missing:
        where = ["archived" if n in archived else "not found" for n in missing]
        raise SystemExit("error: listed in SECTIONS but not in benchmarks/results/: " +
                         ", ".join(f"{n} ({w})" for n, w in zip(missing, where)))
    both = sorted(current & archived)
    if both:
        raise SystemExit(f"error: in both results/ and results/archive/: {', '.join(both)}")
    others = sorted(current - set(listed))

    lines = ["# Benchmarks", "",
             ("<!-- Generated by benchmarks/make_readme.py from benchmarks/results/; edit that script, "
              "not this file. -->"), "",
             ("What the benchmark scripts in this folder measured, by question. Every table comes from "
              "`benchmarks/results/`, with the command that made it; the protocol behind the quality "
              "figures (chronological leave-one-out, full ranking over all items) is described in "
              "[docs/protocol.md](../docs/protocol.md)."), ""]
    toc = [(s.anchor, s.title) for s in SECTIONS]
    if others:
        toc.append(("other-results", "Other results"))
    toc += [("archive", "Archive"), ("scripts", "The scripts")]
    lines += [f"- [{title}](#{anchor})" for anchor, title in toc] + [""]
    for s in SECTIONS:
        lines += [f'<a id="{s.anchor}"></a>', "", f"## {s.title}", "", s.intro, ""]
        for e in s.entries:
            lines += render_entry(e, RESULTS, "results/")
    if others:
        lines += ['<a id="other-results"></a>', "", "## Other results", "",
                  "Results not yet filed under a question (add them to SECTIONS in make_readme.py).", ""]
        for name in others:
            lines += render_entry(Entry(name, name, ""), RESULTS, "results/")
    lines += ['<a id="archive"></a>', "", "## Archive", "",
              "Superseded results, kept for their records (later tables carry some of their runs):", ""]
    if archived:
        lines += ["| result | why it was set aside |", "|---|---|"]
        for name in sorted(archived):
            reason = ARCHIVED.get(name, "superseded")
            lines.append(f"| [{name}](results/archive/{name}.md) | {reason} |")
    else:
        lines.append("None.")
    lines += ["", '<a id="scripts"></a>', "", "## The scripts", "", SCRIPTS]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when benchmarks/README.md is out of date")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = README.read_text(encoding="utf-8") if README.is_file() else None
        if current != text:
            print(f"{README}: out of date; run `python benchmarks/make_readme.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(text, encoding="utf-8", newline="\n")
    print(f"{README}: {len(text.splitlines())} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
