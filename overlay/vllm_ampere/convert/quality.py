"""Quality report: per tensor class, SNR and max error of the converted weights against the
native dequantized values; for routed experts also what absmax7 would have left (the gain of
the chosen scale mode over absmax7). Sums are float64 (experts: exact group sums) merged with
math.fsum in shard order, so the report is the same for any run, resumed or not."""

from __future__ import annotations

import json
import math

Stats = dict[str, dict[str, float]]  # class -> {tensors, values, signal, sq_err, max_abs_err[, sq_err_absmax7]}


def add(stats: Stats, cls: str, values: int, signal: float, sq_err: float, max_abs_err: float, sq_err_absmax7: float | None = None) -> None:
    s = stats.setdefault(cls, {"tensors": 0, "values": 0, "signal": 0.0, "sq_err": 0.0, "max_abs_err": 0.0})
    s["tensors"] += 1
    s["values"] += values
    s["signal"] = math.fsum((s["signal"], signal))
    s["sq_err"] = math.fsum((s["sq_err"], sq_err))
    s["max_abs_err"] = max(s["max_abs_err"], max_abs_err)
    if sq_err_absmax7 is not None:
        s["sq_err_absmax7"] = math.fsum((s.get("sq_err_absmax7", 0.0), sq_err_absmax7))


def merge(per_shard: list[Stats]) -> Stats:
    out: Stats = {}
    for stats in per_shard:
        for cls in sorted(stats):
            s = stats[cls]
            o = out.setdefault(cls, {k: 0 if k in ("tensors", "values") else 0.0 for k in s})
            for k, v in s.items():
                o[k] = max(o[k], v) if k == "max_abs_err" else (o[k] + v if k in ("tensors", "values") else math.fsum((o[k], v)))
    return dict(sorted(out.items()))


def _db(num: float, den: float) -> float | None:
    if den == 0:
        return None  # exact: infinite SNR
    return 10 * math.log10(num / den) if num > 0 else float("-inf")


def report(stats: Stats, header: dict) -> dict:
    classes = {}
    for cls, s in stats.items():
        row = {
            "tensors": s["tensors"],
            "values": s["values"],
            "snr_db": _db(s["signal"], s["sq_err"]),
            "max_abs_err": s["max_abs_err"],
            "rms_err": math.sqrt(s["sq_err"] / s["values"]) if s["values"] else 0.0,
        }
        if "sq_err_absmax7" in s:
            row["snr_db_absmax7"] = _db(s["signal"], s["sq_err_absmax7"])
            row["gain_over_absmax7_db"] = _db(s["sq_err_absmax7"], s["sq_err"])
        classes[cls] = row
    return {**header, "classes": classes}


def summary_text(rep: dict) -> str:
    lines = [f"dsv4_int quality ({rep['scale_mode']}, dense {rep['dense_int8']}): SNR dB / max |err| per tensor class"]
    for cls, r in rep["classes"].items():
        snr = "exact" if r["snr_db"] is None else f"{r['snr_db']:.2f}"
        extra = ""
        if "gain_over_absmax7_db" in r:
            gain = r["gain_over_absmax7_db"]
            extra = f"  gain over absmax7 {gain:+.3f} dB" if gain is not None else "  gain over absmax7: both exact"
        lines.append(f"  {cls:32s} {snr:>8s} dB  max {r['max_abs_err']:.3e}  ({r['tensors']} tensors){extra}")
    return "\n".join(lines) + "\n"


def dumps(rep: dict) -> bytes:
    return (json.dumps(rep, indent=2) + "\n").encode()
