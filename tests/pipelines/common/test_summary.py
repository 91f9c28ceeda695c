import json
import math

from latentforge.pipelines.common.summary import IMAGE_KEY_FIGURES, write_summary


def test_summary_keeps_the_named_finite_numbers_in_order(tmp_path):
    metrics = {"sample_validity": 0.5, "recon_psnr_db": 30, "edit_clean_shape": 0.9, "iwae_nll": math.nan,
               "features_trusted": True, "info": {"family": "vae"}, "gmm_sample_validity": 0.7}
    written = write_summary(tmp_path, metrics, IMAGE_KEY_FIGURES)
    assert written == {"recon_psnr_db": 30.0, "sample_validity": 0.5, "gmm_sample_validity": 0.7}
    assert list(json.loads((tmp_path / "summary.json").read_text())) == list(written)


def test_summary_of_the_gmm_sampler_mirrors_the_sample_figures():
    assert {"gmm_sample_validity", "gmm_sample_precision_ratio", "gmm_sample_recall_ratio", "gmm_sample_coverage",
            "gmm_fd_classifier_ratio"} <= set(IMAGE_KEY_FIGURES)
