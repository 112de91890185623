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
# The spike guard's state (agent/spikes.py): held = clipped or skipped by the guard.
GUARD_HELD_FRACTION = "gradwatch_guard_held_fraction"  # share (0..1) of the last 50 optimizer steps held
GUARD_HELD_RATIO_MAX = "gradwatch_guard_held_ratio_max"  # max held norm / median of accepted norms since this scraper's previous scrape; 0: none
GUARD_HELD_STEP = "gradwatch_guard_held_step"  # step of the latest held step; absent before any
GUARD_BOUND = "gradwatch_guard_bound"  # the bound in force for the next step; absent while warming up
COMMANDS_APPLIED_TOTAL = "gradwatch_commands_applied_total"  # {action}

PER_LAYER = (GRAD_NORM, GRAD_ABS_MEAN, GRAD_ABS_MAX, GRAD_ABS_MIN, PARAM_NORM, UPDATE_RATIO)

LABEL_RUN = "run"
LABEL_RANK = "rank"
LABEL_LAYER = "layer"

# Position of each exported layer in model order (0 = nearest the input), so the
# watchdog can compare first and last layers without knowing the model.
LAYER_DEPTH = "gradwatch_layer_depth"  # {layer}
