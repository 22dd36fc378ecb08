"""What ``vhdcore bench`` reports: one :class:`Result` per figure, the
targets each is checked against (PASS/MISS), and the text table."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["GB", "GiB", "MiB", "PEER_TARGETS", "REPO_TARGETS", "TARGETS", "Result",
           "check", "format_report", "target_text"]

MiB = 1024 * 1024
GiB = 1024 * MiB
GB = 1e9

#: the repository's targets (``bench/repo.py``): result name -> (what is
#: compared, operator, value, text), as in :data:`TARGETS`
REPO_TARGETS: dict[str, tuple[str, str, float, str]] = {
    "repo.incremental_time": ("ratio", "<", 0.20, "<= 20% of first"),
    "repo.incremental_growth": ("ratio", "<", 1.15, "<= 1.15x lz4"),
    "repo.clone_growth": ("ratio", "<", 1.15, "<= 1.15x lz4"),
    "repo.first_image": ("ratio", "<", 1.10, "<= 1.10x image --to"),
    "repo.restore": ("ratio", ">=", 0.8, ">= 0.8x image --to"),
    "memory.repo": ("mib", "<", 256.0, "< 256 MiB"),
}

#: coalesce against vhd-util (``bench/coalesce_peer.py``; ratio = vhd-util's
#: seconds / ours)
PEER_TARGETS: dict[str, tuple[str, str, float, str]] = {
    "coalesce.vs_vhd_util.random4k.cold": ("ratio", ">=", 20.0, ">= 20x vhd-util (goal 100x)"),
    "coalesce.vs_vhd_util.random4k.warm": ("ratio", ">=", 20.0, ">= 20x vhd-util (goal 100x)"),
    "coalesce.vs_vhd_util.blocks.cold": ("ratio", ">=", 1.0, ">= 1.0x vhd-util (goal 1.5x)"),
}

#: the targets of the issues, by result name: (what is compared, operator, value, text)
TARGETS: dict[str, tuple[str, str, float, str]] = {
    "kernel.overlay_full": ("ratio", ">=", 0.5, ">= 0.5x memcpy"),
    "kernel.is_zero": ("ratio", ">=", 0.5, ">= 0.5x memcpy"),
    "twin.overlay_scattered": ("ratio", ">=", 20.0, ">= 20x twin"),
    "twin.find_runs": ("ratio", ">=", 20.0, ">= 20x twin"),
    "twin.merge_scattered": ("ratio", ">=", 20.0, ">= 20x twin"),
    "flatten.vhd_cold": ("ratio", ">=", 1.0, ">= 1x qemu-img -O vpc (goal 2x)"),
    "flatten.raw": ("ratio", ">=", 1.0, ">= 1x qemu-img -O raw (goal 1.5x)"),
    "flatten.raw_cold": ("ratio", ">=", 1.0, ">= 1x qemu-img -O raw (goal 1.5x)"),
    "coalesce.full": ("gbps", ">=", 1.0, ">= 1 GB/s"),
    "coalesce.scattered": ("gbps", ">=", 0.2, ">= 200 MB/s"),
    "imaging.pipeline": ("ratio", ">=", 0.7, ">= 0.7x slowest stage"),
    "memory.flatten": ("mib", "<", 256.0, "< 256 MiB"),
    "memory.imaging": ("mib", "<", 256.0, "< 256 MiB"),
    "memory.imaging_large_segments": ("mib", "<", 256.0, "< 256 MiB"),
    **REPO_TARGETS,
    **PEER_TARGETS,
}


@dataclass
class Result:
    """One measured figure.

    ``bytes`` processed in ``seconds`` (the median of the repetitions) give
    ``gbps``; ``ratio`` compares it with the reference ``ratio_to``.  Memory
    results put the peak resident size in ``peak_bytes`` (``bytes`` and
    ``seconds`` are then the virtual disk and the run time).  ``passed`` is
    None where there is no target (or it could not be checked).
    """

    name: str
    title: str
    group: str
    bytes: int
    seconds: float
    reps: int
    ratio: float | None = None
    ratio_to: str = ""
    target: str = ""
    passed: bool | None = None
    note: str = ""
    peak_bytes: int | None = None

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / GB if self.seconds > 0 else 0.0

    @property
    def verdict(self) -> str:
        """PASS, MISS, ``n/a`` (a target that could not be checked) or ``info``."""
        if self.passed is None:
            return "n/a" if self.target else "info"
        return "PASS" if self.passed else "MISS"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["gbps"] = round(self.gbps, 4)
        d["seconds"] = self.seconds
        d["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        d["pass"] = d.pop("passed")
        d["verdict"] = self.verdict
        if self.peak_bytes is not None:
            d["peak_mib"] = round(self.peak_bytes / MiB, 1)
        return d


def check(name: str, value: float | None) -> bool | None:
    """Whether ``value`` meets the target of ``name`` (None: no target or value)."""
    tgt = TARGETS.get(name)
    if tgt is None or value is None:
        return None
    _, op, limit, _ = tgt
    return value >= limit if op == ">=" else value < limit


def target_text(name: str) -> str:
    tgt = TARGETS.get(name)
    return tgt[3] if tgt else ""


def _fmt_ratio(r: dict[str, Any]) -> str:
    if r["ratio"] is None:
        return "-"
    v = r["ratio"]
    return f"{v:.2f}x" if v < 100 else f"{v:.0f}x"


def _header(report: dict[str, Any]) -> list[str]:
    m, s = report["machine"], report["settings"]
    lines = [
        (f"vhdcore bench ({m['date']}): {m['cpus_usable']} of {m['cpu_count']} CPUs "
         f"({m['cpu_model']}), Python {m['python']}, numpy {m['numpy']}, kernel "
         f"{m['backend']}; workload {s['size'] // MiB} MiB, median of {s['reps']}"),
        (f"memory copy bandwidth (the reference): {s['memcpy_gbps']:.2f} GB/s; files on "
         f"{s['workdir_fs']}, in the page cache, no fsync; GB/s = 10^9 bytes/s"),
    ]
    busy = m.get("cpu_busy_before")
    if busy is not None and busy > 0.2:
        lines.append(f"warning: other processes kept {busy:.0%} of the CPUs busy just before "
                     "the run; they share the CPUs with it and the figures are low")
    lines.append("")
    return lines


def format_report(report: dict[str, Any], *, notes: bool = True) -> str:
    """The report as a text table (what ``vhdcore bench`` prints)."""
    lines = _header(report)
    head = f"{'result':<26} {'measurement':<46} {'GB/s':>7} {'ratio':>7}  {'of':<16} " \
           f"{'target':<21} {'':<4}"
    lines.append(head)
    lines.append("-" * len(head))
    footnotes: list[str] = []
    for r in report["results"]:
        if r.get("peak_bytes") is not None:
            value = f"{r['peak_bytes'] / MiB:.0f}MiB"
        else:
            value = f"{r['gbps']:.3f}" if r["gbps"] < 10 else f"{r['gbps']:.2f}"
        lines.append(f"{r['name']:<26} {r['title'][:46]:<46} {value:>7} {_fmt_ratio(r):>7}  "
                     f"{r['ratio_to'][:16]:<16} {r['target']:<21} {r['verdict']}".rstrip())
        if notes and r["note"] and (r["verdict"] in ("MISS", "n/a") or r["name"] in _SHOW_NOTES):
            footnotes.append(f"  {r['name']}: {r['note']}")
    sm = report["summary"]
    lines.append("-" * len(head))
    tail = f"{sm['pass']} PASS, {sm['miss']} MISS"
    if sm["unchecked"]:
        tail += f", unchecked: {', '.join(sm['unchecked'])}"
    lines.append(f"{tail}; ran {sm['seconds']:.0f} s")
    if footnotes:
        lines += ["", "notes:", *footnotes]
    return "\n".join(lines)


_SHOW_NOTES = {"peer.qemu_img", "twin.merge_scattered", "coalesce.scattered_holes",
               "imaging.pipeline", "imaging.virtual", "lz4.2threads", "memory.flatten",
               "memory.imaging", "memory.imaging_large_segments", "repo.first_image",
               "repo.incremental_growth", "repo.clone_growth", "repo.restore", "memory.repo"}
