"""CANDLE training: teacher loading, calibration, distillation with adversarial balancing, evaluation."""
from candle_ext.train.balancer import AdversarialBalancer
from candle_ext.train.calibrate import calibrate_step, make_calibration
from candle_ext.train.distill import MODES, DistillParts, build_distill_parts, distill_step, split_student
from candle_ext.train.evaluate import accuracy_report, classifier_weight_norms, markdown_table
from candle_ext.train.losses import (feature_similarity_loss, kl_loss, label_aware_epsilons,
                                     label_aware_smoothing_loss)
from candle_ext.train.teacher import FrozenEncoder, load_teacher

__all__ = ["AdversarialBalancer", "calibrate_step", "make_calibration", "MODES", "DistillParts",
           "build_distill_parts", "distill_step", "split_student", "accuracy_report", "classifier_weight_norms",
           "markdown_table", "feature_similarity_loss", "kl_loss", "label_aware_epsilons",
           "label_aware_smoothing_loss", "FrozenEncoder", "load_teacher"]
