"""make bench: `python -m scripts.bench` runs every benchmark here and prints one table of ratios."""
import argparse
from collections.abc import Callable


def format_table(rows: list[tuple[str, dict]]) -> str:
    """(suite, row) pairs, each row `dict(name, ours, baseline, ratio, how)`, as one aligned table."""
    width = max(len(r["name"]) for _, r in rows)
    lines = [f"{'suite':<8} {'what':<{width}} {'ours':>10} {'baseline':>10} {'ratio':>7}  how"]
    for suite, r in rows:
        lines.append(f"{suite:<8} {r['name']:<{width}} {r['ours']:>10.3f} {r['baseline']:>10.3f} "
                     f"{r['ratio']:>6.2f}x  {r['how']}")
    return "\n".join(lines)


def suite_main(suite: str, run: Callable[..., list[dict]], doc: str, **defaults) -> None:
    """The command line of one suite: each keyword of `run` given here becomes a flag of its type."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    print(format_table([(suite, row) for row in run(**vars(parser.parse_args()))]), flush=True)
