"""Asset group `simulation`: lenstronomy-simulated training cutouts."""


import dagster as dg
from pydantic import Field

from lens_assets.assets._common import (counts_markdown, gallery_from_files, png_markdown, sha256_of_strings,
                                        survey_asset)
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.families import available_families, load_family
from lens_assets.science.simulation import simulate_to_directory, summarize_truth
from lens_assets.science.surveys import get_survey

SIMULATION_CODE_VERSION = "sim-2"


class SimulationConfig(dg.Config):
    n_cutouts: int = Field(default=500, ge=1, description="objects to simulate")
    seed: int = Field(default=0, ge=0, description="population seed; a (survey, family, seed) is reproducible")
    family: str = Field(default="baseline",
                        description=f"simulation family: one of {available_families()} or a path to a .toml")
    heldout_family: str = Field(default="heldout", description="family simulated alongside for robustness "
                                "scoring (kept out of the splits, scored by bologna_report)")
    n_heldout: int | None = Field(default=None, ge=0, description="held-out-family objects; default n_cutouts // 5, "
                                  "0 for none")
    workers: int = Field(default=0, description="processes; 0 = every core")


def simulation_drop(family: str, seed: int) -> str:
    """The drop folder under ``raw/<survey>/``: ``sim-<seed>`` for baseline, ``sim-<family>-<seed>`` otherwise."""
    return f"sim-{seed}" if family == "baseline" else f"sim-{family}-{seed}"


@survey_asset(
    group_name="simulation",
    kinds={"python", "fits"},
    code_version=SIMULATION_CODE_VERSION,
)
def simulated_cutouts(context: dg.AssetExecutionContext, config: SimulationConfig,
                      storage: LocalStorage) -> dg.MaterializeResult:
    """Simulated lens and non-lens cutouts as inbox-contract FITS, images in e-/s with MAGZP (AB).

    SIE + shear lenses with Sersic or clumpy sources or lensed quasars, and hard
    non-lenses, drawn with the survey's bands, pixel scale, seeing and noise;
    written to ``raw/<survey>/sim-<seed>/`` with the truth in the headers. A
    held-out family (different source morphology, PSF profile, colours, noise
    and negatives) is simulated beside it into ``raw/<survey>/sim-<family>-<seed>/``:
    the splits leave it out and ``bologna_report`` scores it for robustness.
    """
    survey = get_survey(context.partition_key)
    family = load_family(config.family)
    n_heldout = config.n_cutouts // 5 if config.n_heldout is None else config.n_heldout
    runs = [(family, config.n_cutouts)]
    if n_heldout:
        heldout = load_family(config.heldout_family)
        if heldout.name == family.name:
            raise dg.Failure(f"heldout_family {heldout.name!r} is the training family: choose a different one")
        runs.append((heldout, n_heldout))
    made = {}
    for fam, n in runs:
        drop = simulation_drop(fam.name, config.seed)
        with storage.staged_dir(f"{survey.name}-{drop}") as staged:
            truth, seconds = simulate_to_directory(survey, fam, n_cutouts=n, seed=config.seed, out_dir=staged,
                                                   workers=config.workers)
            dest = storage.publish_dir(staged, "raw", survey.name, drop)
        context.log.info(f"simulated {len(truth)} {survey.name} cutouts ({fam.name}, seed {config.seed}) "
                         f"in {seconds:.1f}s into {dest}")
        made[fam.name] = (drop, dest, truth, seconds)
    drop, dest, truth, seconds = made[family.name]
    summary = summarize_truth(truth, survey)
    shown = truth.groupby("label", group_keys=False).head(9).sort_values("label", ascending=False)
    gallery = gallery_from_files(
        [dest / f for f in shown["file"]], [storage.relative(dest / f) for f in shown["file"]],
        [f"{k} fr={fr:.2f}" if lab else k for k, fr, lab in zip(shown["kind"], shown["flux_ratio"], shown["label"])],
        survey, storage.path("reports", survey.name, f"simulated_{drop}_gallery.png"))
    storage.push("reports", survey.name, f"simulated_{drop}_gallery.png")
    metadata = {
        "path": dg.MetadataValue.path(str(dest)),
        "family": family.name,
        "family_sha256": family.sha256,
        "seed": config.seed,
        "n_cutouts": summary["n_cutouts"],
        "n_lenses": summary["n_lenses"],
        "n_nonlenses": summary["n_nonlenses"],
        "by_kind": counts_markdown(summary["by_kind"], key="kind"),
        "cutouts_per_s": float(len(truth) / seconds),
        "gallery": png_markdown(gallery, alt="simulated cutouts"),
        "n_heldout": n_heldout,
    }
    if n_heldout:
        h_drop, h_dest, h_truth, _ = made[heldout.name]
        metadata.update({"heldout_family": heldout.name, "heldout_family_sha256": heldout.sha256,
                         "heldout_path": dg.MetadataValue.path(str(h_dest))})
    for k in ("lens_share_flux_ratio_lt_0.1", "lens_share_theta_e_below_seeing"):
        if k in summary:
            metadata[k] = summary[k]
    version = sha256_of_strings([survey.name, str(config.seed), SIMULATION_CODE_VERSION,
                                 *(f"{f.name}:{f.sha256}:{n}" for f, n in runs)])
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version[:16]))
