"""tests/benchmarks/paper_claims.py's bookkeeping: which cells the grid runs, in what order, and the mean ± std
tables it writes (the benchmark itself measures; this checks its arithmetic)."""
import json
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks"))
import paper_claims  # noqa: E402


def test_cells_run_seed_by_seed_and_variants_only_for_progressive():
    args = SimpleNamespace(seeds=[0, 1], k=[4, 16], schedules=["progressive", "flat"], freeze=["none", "unet"],
                           new_rank_init=["zero"], p_uncond=[0.1], p_cut=[0.2], stage_steps=[paper_claims.STAGE_STEPS])
    cells = paper_claims.grid_cells(args)
    assert [(c.schedule, c.freeze, c.k, c.seed) for c in cells[:6]] == [
        ("progressive", "none", 4, 0), ("progressive", "unet", 4, 0), ("flat", "none", 4, 0),
        ("progressive", "none", 16, 0), ("progressive", "unet", 16, 0), ("flat", "none", 16, 0)]
    assert len(cells) == 12 and all(c.seed == 1 for c in cells[6:])
    assert [paper_claims.cell_name(c) for c in cells[:3]] == ["progressive-k4-s0", "progressive+unet-k4-s0",
                                                               "flat-k4-s0"]
    args.freeze, args.new_rank_init = ["none"], ["zero", "random"]
    assert [paper_claims.cell_name(c) for c in paper_claims.grid_cells(args)[:2]] == [
        "progressive-k4-s0", "progressive+random-init-k4-s0"]
    # the dropout rates and stage lengths are variants of every schedule; the base values add nothing to a name
    args.new_rank_init, args.p_uncond, args.p_cut, args.stage_steps = ["zero"], [0.1, 0.2], [0.0], ["50,950"]
    assert [paper_claims.cell_name(c) for c in paper_claims.grid_cells(args)[:4]] == [
        "progressive+pcut0+steps50,950-k4-s0", "progressive+puncond0.2+pcut0+steps50,950-k4-s0",
        "flat+pcut0+steps50,950-k4-s0", "flat+puncond0.2+pcut0+steps50,950-k4-s0"]


def test_report_averages_over_seeds(tmp_path):
    def cell(schedule, freeze, k, seed, species, negatives=("null", "parent", "root"), init="zero", p_cut=0.2):
        c = paper_claims.Cell(schedule, freeze, init, 0.1, p_cut, paper_claims.STAGE_STEPS, k, seed)
        folder = tmp_path / paper_claims.cell_name(c)
        folder.mkdir()
        scores = {n: {"species": species, "genus": 0.5, "family": 1.0, "classifier_fd": 10.0 * (seed + 1)}
                  for n in negatives}
        (folder / "result.json").write_text(json.dumps({**c._asdict(), "scores": scores}))

    cell("progressive", "none", 4, 0, 0.2)
    cell("progressive", "none", 4, 1, 0.4)
    cell("progressive", "unet", 4, 0, 0.1)
    cell("progressive", "none", 4, 0, 0.6, init="random")
    cell("flat", "none", 4, 0, 0.3, negatives=("null",))
    cell("flat", "none", 4, 0, 0.9, negatives=("null",), p_cut=0.0)
    # a cell written before the grid varied the dropout rates: no such keys, so the base values
    (tmp_path / "flat-k16-s0").mkdir()
    (tmp_path / "flat-k16-s0" / "result.json").write_text(json.dumps(
        {"schedule": "flat", "freeze": "none", "k": 16, "seed": 0,
         "scores": {"null": {"species": 0.5, "genus": 0.5, "family": 1.0}}}))
    (tmp_path / "flat-k4-s1").mkdir()  # an unfinished cell: no result.json, not counted
    paper_claims.report(SimpleNamespace(out=str(tmp_path), figure=str(tmp_path / "fig.png")))
    lines = (tmp_path / "table.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ")][1:]
    assert rows[0] == "| progressive | 4 | null | 2 | 30.0 ± 10.0 | - | - | 50.0 ± 0.0 | 100.0 ± 0.0 | 15.0 ± 5.0 | - | - |"
    assert rows[3].startswith("| progressive (random init) | 4 | null | 1 | 60.0 ± 0.0 |")
    assert rows[6].startswith("| progressive (unet frozen) | 4 | null | 1 | 10.0 ± 0.0 |")
    assert rows[9].startswith("| flat | 4 | null | 1 | 30.0 ± 0.0 |")
    assert rows[10].startswith("| flat | 16 | null | 1 | 50.0 ± 0.0 |")
    assert rows[11].startswith("| flat (p_cut 0) | 4 | null | 1 | 90.0 ± 0.0 |")
    assert "| progressive (random init) | 60.0 ± 0.0 | - |" in lines and "| progressive | 30.0 ± 10.0 | - |" in lines
    # the claims, paired by seed with the base flags: only seed 0 has both a progressive and a flat run
    assert "| 4 | - | - | -10.0 ± 0.0 (1) | - | +0.0 ± 0.0 (2) | +0.0 ± 0.0 (2) |" in lines
    # each variant against the base progressive cell of the same seed (flat: seed 0 only)
    assert "| progressive | 4 | 2 | 30.0 ± 10.0 |  | 50.0 | 100.0 |" in lines
    assert "| progressive (unet frozen) | 4 | 1 | 10.0 ± 0.0 | -10.0 ± 0.0 (1) | 50.0 | 100.0 |" in lines
    assert "| flat (p_cut 0) | 4 | 1 | 90.0 ± 0.0 | +70.0 ± 0.0 (1) | 50.0 | 100.0 |" in lines
    assert (tmp_path / "fig.png").stat().st_size > 1000


def test_guidance_table_from_the_sweep(tmp_path):
    for seed, acc in ((0, {"1": 0.2, "3": 0.5}), (1, {"1": 0.4, "3": 0.7, "5": 0.8})):
        folder = tmp_path / f"progressive-k4-s{seed}"
        folder.mkdir()
        (folder / "result.json").write_text(json.dumps({"schedule": "progressive", "k": 4, "seed": seed}))
        (folder / "guidance.json").write_text(json.dumps({s: {"species": a} for s, a in acc.items()}))
    (tmp_path / "flat-k4-s0").mkdir()  # a cell without a sweep: not in the table
    lines = paper_claims.guidance_table(str(tmp_path)).splitlines()
    assert "| schedule | k | scale 1 | scale 3 | scale 5 |" in lines
    assert "| progressive | 4 | 30.0 ± 10.0 (2) | 60.0 ± 10.0 (2) | 80.0 ± 0.0 (1) |" in lines
    assert paper_claims.guidance_table(str(tmp_path / "flat-k4-s0")) == ""


def test_rare_and_common_species_of_a_long_tail(tmp_path):
    """pairs:64/4: the rare sibling of every genus is scored apart, and the rare-species claim is paired by seed."""
    counts = paper_claims.species_counts("pairs:64/4", 0)
    assert sorted(set(counts)) == [4, 64] and counts.count(4) == 24
    for schedule, rare_right in (("progressive", 0.75), ("flat", 0.25)):
        c = paper_claims.Cell(schedule, "none", "zero", 0.1, 0.2, paper_claims.STAGE_STEPS, "pairs:64/4", 0)
        right = [rare_right if n == 4 else 1.0 for n in counts]  # per species, in toy_species() order
        folder = tmp_path / paper_claims.cell_name(c)
        folder.mkdir()
        scores = {"null": {"species": sum(right) / 48, "genus": 1.0, "family": 1.0, "per_species": right}}
        (folder / "result.json").write_text(json.dumps({**c._asdict(), "scores": scores, "train_counts": counts}))
    assert paper_claims.cell_name(c) == "flat-kpairs64-4-s0"
    paper_claims.report(SimpleNamespace(out=str(tmp_path), figure=str(tmp_path / "fig.png")))
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert "| progressive | pairs:64/4 | null | 1 | 87.5 ± 0.0 | 75.0 ± 0.0 | 100.0 ± 0.0 | 100.0 ± 0.0 | 100.0 ± 0.0 " \
           "| - | - | - |" in lines
    assert "| pairs:64/4 | - | - | +25.0 ± 0.0 (1) | +50.0 ± 0.0 (1) | - | - |" in lines


def test_a_grid_resumed_in_a_fresh_out_skips_the_kept_cells(tmp_path):
    """A new session has none of the old --out: the scores committed under --results are the record."""
    args = SimpleNamespace(schedules=["progressive", "flat"], freeze=["none"], new_rank_init=["zero"], k=["4"],
                           seeds=[0], p_uncond=[0.1], p_cut=[0.2], stage_steps=[paper_claims.STAGE_STEPS],
                           out=str(tmp_path / "out"), results=str(tmp_path / "kept"))
    kept, fresh = paper_claims.grid_cells(args)
    (tmp_path / "kept" / paper_claims.cell_name(kept)).mkdir(parents=True)
    (tmp_path / "kept" / paper_claims.cell_name(kept) / "result.json").write_text('{"seed": 0}')
    paper_claims.restore_results(args, [kept, fresh])
    assert (tmp_path / "out" / paper_claims.cell_name(kept) / "result.json").read_text() == '{"seed": 0}'
    assert not (tmp_path / "out" / paper_claims.cell_name(fresh)).exists()
