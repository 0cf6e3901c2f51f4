"""The representation family's shared test bed (issue 5): data splits and shifts (`data`), small backbones and
heads (`nets`), supervised fitting, evaluation and probes (`loops`), and class statistics of features
(`features`). Paper-specific pieces live in modules named after what they hold (continual, tta, distill, ...)."""
