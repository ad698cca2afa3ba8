"""Asset group `simulation`: simulated training cutouts (lenstronomy, or the torch renderer), held-out families and
lens/twin pairs."""


from typing import Literal

import dagster as dg
from pydantic import Field

from lens_assets import layout
from lens_assets.assets._common import (counts_markdown, gallery_from_files, path_metadata, png_markdown,
                                        sha256_of_strings, survey_asset)
from lens_assets.ml.torch_simulation import RENDERERS, torch_refusal
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.families import available_families, load_family
from lens_assets.science.simulation import (LENSING_ONLY, simulate_pairs_to_directory, simulate_to_directory,
                                            summarize_truth)
from lens_assets.science.surveys import get_survey

SIMULATION_CODE_VERSION = "sim-7"  # 4: a lens's stars are unlensed light in its truth (flux ratio, arc S/N);
# 5: SCENE_TE, the scene's Einstein radius, lens or not; 6: SIMROLE, what each file is for; 7: lensed quasars'
# image positions reproducible (lenstronomy's solver seeded from its inputs)


class SimulationConfig(dg.Config):
    n_cutouts: int = Field(default=500, ge=1, description="objects to simulate")
    seed: int = Field(default=0, ge=0, description="population seed; a (survey, family, seed) is reproducible")
    family: str = Field(default="physical",
                        description=f"simulation family: one of {available_families()} or a path to a .toml")
    heldout_family: str = Field(default="heldout", description="family simulated alongside for robustness "
                                "scoring (kept out of the splits, scored by bologna_report)")
    more_heldout_families: list[str] = Field(
        default=[], description="further held-out families, each with n_heldout objects (e.g. 'galsim', rendered by "
        "other code than lenstronomy)")
    n_heldout: int | None = Field(default=None, ge=0, description="objects per held-out family; default "
                                  "n_cutouts // 5, 0 for none")
    n_pairs: int | None = Field(default=None, ge=0, description="lens/twin pairs of the (physical) training family "
                                "for the lensing-only AUROC, kept out of the splits; "
                                "default n_cutouts // 10, 0 for none")
    pairs_family: str | None = Field(default=None, description="physical family the lens/twin pairs are drawn from; "
                                     "default the training family (set it to compare training families on the "
                                     "same pairs)")
    workers: int = Field(default=0, description="processes; 0 = every core")
    renderer: Literal[RENDERERS] = Field(default="lenstronomy", description="what draws the training family's light: "
                          "'lenstronomy' (the reference) or 'torch' (ml/torch_render a batch at a time, float32; the "
                          "same objects, noise draws and files, the pixels within 1e-3 of the band's maximum of "
                          "lenstronomy's, 2e-4 seen); held-out families and the lens/twin pairs keep their own "
                          "renderers")


def simulate_family(survey, family, *, renderer: str = "lenstronomy", **kwargs):
    """``simulate_to_directory`` with the family's own renderer (lenstronomy, or GalSim for ``renderer = galsim``);
    ``renderer="torch"`` draws a lenstronomy family's light with the batched torch renderer instead (and refuses any
    other family)."""
    if renderer == "torch":
        from lens_assets.ml.torch_simulation import simulate_to_directory_torch

        return simulate_to_directory_torch(survey, family, **kwargs)
    if family.renderer == "galsim":
        from lens_assets.ml.render_galsim import load_galsim_family, simulate_galsim_to_directory

        return simulate_galsim_to_directory(survey, load_galsim_family(family.path), **kwargs)
    return simulate_to_directory(survey, family, **kwargs)


@survey_asset(
    group_name="simulation",
    kinds={"python", "fits"},
    code_version=SIMULATION_CODE_VERSION,
)
def simulated_cutouts(context: dg.AssetExecutionContext, config: SimulationConfig,
                      storage: LocalStorage) -> dg.MaterializeResult:
    """Simulated lens and non-lens cutouts as inbox-contract FITS, images in e-/s with MAGZP (AB).

    The default family (``physical``) draws scenes from the sky's relations
    (velocity-dispersion function, cosmology, Faber–Jackson, size relations,
    number counts, a detectability selection) and makes its non-lenses from the
    same scenes: twins with the deflection switched off and lens-like unlensed
    structure of the arcs' flux and colour, with one environment for both
    classes. Written to ``raw/<survey>/sim-<family>-<seed>/`` with the truth in
    the headers. Beside it: held-out families (``raw/<survey>/sim-<family>-<seed>/``,
    kept out of the splits and scored by ``bologna_report``, one of them rendered
    by other code than lenstronomy) and lens/twin pairs of the training family
    (``sim-lensing_only-<seed>``) for the lensing-only AUROC.
    """
    survey = get_survey(context.partition_key)
    family = load_family(config.family)
    refusal = torch_refusal(family) if config.renderer == "torch" else None
    if refusal:  # before any family is simulated
        raise dg.Failure(f"simulated_cutouts: renderer 'torch' draws families rendered by lenstronomy; {refusal}: "
                         "leave renderer at 'lenstronomy'")
    n_heldout = config.n_cutouts // 5 if config.n_heldout is None else config.n_heldout
    n_pairs = config.n_cutouts // 10 if config.n_pairs is None else config.n_pairs
    pairs_family = load_family(config.pairs_family) if config.pairs_family else family
    if n_pairs and pairs_family.population != "physical":
        context.log.warning(f"family {pairs_family.name} is not physical: no lens/twin pairs (n_pairs ignored)")
        n_pairs = 0
    runs = [(family, config.n_cutouts, "train")]
    heldout = []
    if n_heldout:
        for name in dict.fromkeys([config.heldout_family, *config.more_heldout_families]):
            fam = load_family(name)
            if fam.name == family.name:
                raise dg.Failure(f"held-out family {fam.name!r} is the training family: choose a different one")
            heldout.append(fam)
            runs.append((fam, n_heldout, "heldout"))
    made = {}
    for fam, n, role in runs:
        drop = layout.simulation_drop(fam.name, config.seed)
        with storage.staged_dir(f"{survey.name}-{drop}") as staged:
            truth, seconds = simulate_family(survey, fam, n_cutouts=n, seed=config.seed, out_dir=staged,
                                             workers=config.workers, role=role,
                                             renderer=config.renderer if role == "train" else "lenstronomy")
            dest = storage.publish_dir(staged, *layout.raw_drop(survey.name, drop))
        context.log.info(f"simulated {len(truth)} {survey.name} cutouts ({fam.name}, seed {config.seed}) "
                         f"in {seconds:.1f}s into {dest}")
        made[fam.name] = (drop, dest, truth, seconds)
    if n_pairs:
        drop = layout.simulation_drop(LENSING_ONLY, config.seed)
        with storage.staged_dir(f"{survey.name}-{drop}") as staged:
            pairs, p_seconds = simulate_pairs_to_directory(survey, pairs_family, n_pairs=n_pairs, seed=config.seed,
                                                           out_dir=staged, workers=config.workers)
            pairs_dest = storage.publish_dir(staged, *layout.raw_drop(survey.name, drop))
        context.log.info(f"simulated {n_pairs} lens/twin pairs of {pairs_family.name} in {p_seconds:.1f}s into "
                         f"{pairs_dest}")
    drop, dest, truth, seconds = made[family.name]
    summary = summarize_truth(truth, survey)
    shown = truth.groupby("label", group_keys=False).head(9).sort_values("label", ascending=False)
    gallery = gallery_from_files(
        [dest / f for f in shown["file"]], [storage.relative(dest / f) for f in shown["file"]],
        [f"{k} fr={fr:.2f}" if lab else k for k, fr, lab in zip(shown["kind"], shown["flux_ratio"], shown["label"])],
        survey, storage.path(*layout.simulated_gallery(survey.name, drop)))
    storage.push(*layout.simulated_gallery(survey.name, drop))
    metadata = {
        "path": path_metadata(storage, dest),
        "family": family.name,
        "family_sha256": family.sha256,
        "seed": config.seed,
        "n_cutouts": summary["n_cutouts"],
        "n_lenses": summary["n_lenses"],
        "n_nonlenses": summary["n_nonlenses"],
        "by_kind": counts_markdown(summary["by_kind"], key="kind"),
        "cutouts_per_s": float(len(truth) / seconds),
        "renderer": config.renderer,
        "gallery": png_markdown(gallery, alt="simulated cutouts"),
        "n_heldout": n_heldout,
    }
    if heldout:
        first = heldout[0]
        metadata.update({"heldout_family": first.name, "heldout_family_sha256": first.sha256,
                         "heldout_path": path_metadata(storage, made[first.name][1])})
        for fam in heldout[1:]:
            metadata[f"heldout_{fam.name}_path"] = path_metadata(storage, made[fam.name][1])
            metadata[f"heldout_{fam.name}_family_sha256"] = fam.sha256
        metadata["heldout_families"] = ",".join(f.name for f in heldout)
    metadata["n_pairs"] = n_pairs
    if n_pairs:
        metadata["pairs_path"] = path_metadata(storage, pairs_dest)
    metadata["seconds_by_family"] = dg.MetadataValue.json(
        {**{k: round(v[3], 1) for k, v in made.items()}, **({LENSING_ONLY: round(p_seconds, 1)} if n_pairs else {})})
    for k in ("lens_share_flux_ratio_lt_0.1", "lens_share_theta_e_below_seeing"):
        if k in summary:
            metadata[k] = summary[k]
    renderer = []  # the default's data version as before; the torch renderer's with its own version
    if config.renderer == "torch":
        from lens_assets.ml.torch_simulation import RENDER_VERSION

        renderer = [f"renderer:torch:{RENDER_VERSION}"]
    version = sha256_of_strings([survey.name, str(config.seed), SIMULATION_CODE_VERSION,
                                 *(f"{f.name}:{f.sha256}:{n}" for f, n, _ in runs),
                                 f"pairs:{pairs_family.sha256}:{n_pairs}", *renderer])
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version[:16]))
