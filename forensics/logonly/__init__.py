"""Log-only forensics: instruments that need only the logs and clean episodes of other seeds.

``models``      the fitted reference models (ridge cross-agent and own-dynamics predictors, the
                Kazari-style teammate behaviour model) and their identity checks;
``instruments`` per-step, per-agent scores of every instrument and the CUSUM over each;
``verdict``     calibration of the per-episode false-alarm rate on clean episodes and the one
                fused verdict (Patient-0, detection step, or "no failure found").

See DESIGN.md, "Two settings" (this is the log-only one) and "Faults are classes".
"""
