"""Evaluation (05_evaluation): a finding classifier trained on real images scores synthetic ones, in six files:

- `judge`: the classifier (the judge), its training, predictions and the truth tables;
- `alignment`: AUROC per finding and controllability of side and size, with intervals;
- `fidelity`: FID with three feature extractors and MS-SSIM diversity;
- `memorization`: each synthetic image's nearest training image, searched in chunks;
- `probe`: a linear probe of the text encoder's embeddings;
- `downstream`: classifiers trained with and without synthetic images.

Tables are tidy: one row per model x prompt set x finding x metric. How 05 applies them to a profile's
models is in `experiments`.

Usage::

    truth = truth_table(real["train"])
    net = train_classifier(images_array(real["train"], cfg.image_size), truth, seed=0)
    alignment_table(predict(net, images_array(synthetic, size)), truth_table(synthetic), model="both")
"""

from roentgen_lib.evaluate.alignment import (
    alignment_table, CONTROL_QUESTIONS, NOT_FOUND, read_control, controllability_table, confusion_table,
    wilson_interval, interval_table)
from roentgen_lib.evaluate.downstream import (
    presence_only, downstream_table, downstream_scores)
from roentgen_lib.evaluate.fidelity import (
    ClassifierFeatures, XrvFeatures, XRV_PATHOLOGY, XRV_ALIGNMENT, pretrained_alignment_table,
    unavailable_metrics, inception_features, weights_problem, feature_extractors, rgb_batches,
    frechet_distance, fid_table, MS_SSIM_BETAS, ms_ssim_betas, mean_pairwise_ms_ssim, diversity_table)
from roentgen_lib.evaluate.judge import (
    FINDINGS, LATERAL, SIDES, SIZES, labels_of_row, truth_table, truth_of_labels, truth_of_reports,
    through_vae, images_array, FindingNet, targets, to_input, classifier_loss, blur_share, train_classifier,
    net_device, predict)
from roentgen_lib.evaluate.memorization import (
    PIXEL_SEARCH_SIZE, nearest_distances, pixel_rows, near_copy_thresholds, memorization_audit,
    memorization_summary)
from roentgen_lib.evaluate.probe import (
    text_embeddings, probe_table)

__all__ = [
    'CONTROL_QUESTIONS', 'ClassifierFeatures', 'FINDINGS', 'FindingNet', 'LATERAL', 'MS_SSIM_BETAS',
    'NOT_FOUND', 'PIXEL_SEARCH_SIZE', 'SIDES', 'SIZES', 'XRV_ALIGNMENT', 'XRV_PATHOLOGY', 'XrvFeatures',
    'alignment_table', 'blur_share', 'classifier_loss', 'confusion_table', 'controllability_table',
    'diversity_table', 'downstream_scores', 'downstream_table', 'feature_extractors', 'fid_table',
    'frechet_distance', 'images_array', 'inception_features', 'interval_table', 'labels_of_row',
    'mean_pairwise_ms_ssim', 'memorization_audit', 'memorization_summary', 'ms_ssim_betas',
    'near_copy_thresholds', 'nearest_distances', 'net_device', 'pixel_rows', 'predict', 'presence_only',
    'pretrained_alignment_table', 'probe_table', 'read_control', 'rgb_batches', 'targets', 'text_embeddings',
    'through_vae', 'to_input', 'train_classifier', 'truth_of_labels', 'truth_of_reports', 'truth_table',
    'unavailable_metrics', 'weights_problem', 'wilson_interval']
