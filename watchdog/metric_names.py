"""The metric contract: every name the agent exports and the watchdog, the rule
export and the dashboards read. Change a name here and in every user in one commit.

Prefix ``gradwatch_``; counters end in ``_total`` (the exposition adds the suffix
to the family name given to prometheus-client without it); labels ``run``, ``rank``,
``layer`` — never ``job`` (Prometheus sets it) and never a step label.
"""

PREFIX = "gradwatch_"

STEP = "gradwatch_step"
LOSS = "gradwatch_loss"
LOSS_MAX = "gradwatch_loss_max"  # max since this scraper's previous scrape
LEARNING_RATE = "gradwatch_learning_rate"  # {group}: effective LR (scheduled x scale)
LR_SCALE = "gradwatch_lr_scale"
GRAD_GLOBAL_NORM = "gradwatch_grad_global_norm"
GRAD_GLOBAL_NORM_MAX = "gradwatch_grad_global_norm_max"  # max since this scraper's previous scrape
GRAD_NORM = "gradwatch_grad_norm"  # {layer}
GRAD_ABS_MEAN = "gradwatch_grad_abs_mean"  # {layer}
GRAD_ABS_MAX = "gradwatch_grad_abs_max"  # {layer}
GRAD_ABS_MIN = "gradwatch_grad_abs_min"  # {layer}
PARAM_NORM = "gradwatch_param_norm"  # {layer}
UPDATE_RATIO = "gradwatch_update_ratio"  # {layer}: mean|w_after - w_before| / mean|w_before|
NONFINITE_GRADS_TOTAL = "gradwatch_nonfinite_grads_total"  # {layer, kind}
SKIPPED_STEPS_TOTAL = "gradwatch_skipped_steps_total"  # {reason}
SPIKE_CLIPPED_STEPS_TOTAL = "gradwatch_spike_clipped_steps_total"  # guard clipped a finite norm spike
CLIPPING_ACTIVE = "gradwatch_clipping_active"
CLIP_THRESHOLD = "gradwatch_clip_threshold"
LOSS_SCALE = "gradwatch_loss_scale"  # GradScaler's scale (watch(..., scaler=)); skips: SKIPPED_STEPS_TOTAL{reason="amp_overflow"}
COMMANDS_APPLIED_TOTAL = "gradwatch_commands_applied_total"  # {action}

PER_LAYER = (GRAD_NORM, GRAD_ABS_MEAN, GRAD_ABS_MAX, GRAD_ABS_MIN, PARAM_NORM, UPDATE_RATIO)

LABEL_RUN = "run"
LABEL_RANK = "rank"
LABEL_LAYER = "layer"

# Position of each exported layer in model order (0 = nearest the input), so the
# watchdog can compare first and last layers without knowing the model.
LAYER_DEPTH = "gradwatch_layer_depth"  # {layer}
