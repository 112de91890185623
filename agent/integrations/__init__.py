"""Adapters for the trainers people use, each importing its framework only inside its own module.

    from gradwatch.agent.integrations.lightning import GradwatchCallback             # PyTorch Lightning
    from gradwatch.agent.integrations.huggingface import GradwatchTrainerCallback    # transformers.Trainer

Both attach the same :class:`~gradwatch.agent.Agent` once the framework has built its optimizer,
and hand it the framework's loss, clipping, checkpoints and stop flag (see the README sections).
"""
