"""The registry of the 45 papers (kind "paper") and the overview notebooks (kind "overview"): one row each,
the single source of truth for `alignlab list|run|report` and the notebook contract test.

`status` is "reproduced" when `notebooks/<family>/<slug>.ipynb` exists and "planned" otherwise; a test
keeps the two in step.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

FAMILIES = {
    "guidance": "Guidance and generative alignment (diffusion, flow and autoregressive generators)",
    "llm_alignment": "LLM alignment (preferences, safety, data, representations)",
    "representation": "Representation and classifier alignment (continual, federated, long-tailed, TTA, distillation)",
    "cross_modal": "Cross-modal and sequence alignment (speech CTC, code-NL, cross-lingual, image-text)",
}


@dataclass(frozen=True)
class Paper:
    slug: str
    family: str
    title: str
    year: int | None
    arxiv: str | None
    venue: str
    status: str = "planned"          # "reproduced" once its notebook exists
    main_figure: str | None = None   # the figure the README gallery links to
    kind: str = "paper"              # "paper", or "overview": a notebook across a family's methods

    @property
    def notebook(self) -> str:
        return f"notebooks/{self.family}/{self.slug}.ipynb"

    @property
    def url(self) -> str | None:
        return f"https://arxiv.org/abs/{self.arxiv}" if self.arxiv else None


_PAPERS = [
    Paper("airllm_diffusion_policy_lora", "guidance", "AirLLM: Diffusion Policy-based Adaptive LoRA for Remote Fine-Tuning of LLM over the Air", 2025, "2507.11515", "2025"),
    Paper("apg_adaptive_projected_guidance", "guidance", "Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion Models", 2025, "2410.02416", "ICLR 2025"),
    Paper("cca_guidance_free_ar", "guidance", "Toward Guidance-Free AR Visual Generation via Condition Contrastive Alignment", 2025, "2410.09347", "ICLR 2025, oral"),
    Paper("dynamic_cfg_online_feedback", "guidance", "Dynamic Classifier-Free Diffusion Guidance via Online Feedback", 2025, "2509.16131", "2025; ICLR 2026 per third-party notes"),
    Paper("ear_concept_erasure_ar", "guidance", "EAR: Erasing Concepts from Unified Autoregressive Models", 2025, "2506.20151", "2025"),
    Paper("ezaudio_cfg_rescale", "guidance", "EzAudio: Enhancing Text-to-Audio Generation with Efficient Diffusion Transformer", 2025, "2409.10819", "Interspeech 2025"),
    Paper("flowdirector_flow_steering_edit", "guidance", "FlowDirector: Training-Free Flow Steering for Precise Text-to-Video Editing", 2025, "2506.05046", "2025"),
    Paper("gfcg_gradient_free_classifier_guidance", "guidance", "Gradient-Free Classifier Guidance for Diffusion Model Sampling", 2024, "2411.15393", "2024"),
    Paper("harmony_synccfg", "guidance", "Harmony: Harmonizing Audio and Video Generation through Cross-Task Synergy", 2025, "2511.21579", "Nov 2025; CVPR 2026 per third-party notes"),
    Paper("hmcfg_hypernetwork_personalization", "guidance", "Finetuning-Free Personalization of Text to Image Generation via Hypernetworks", 2025, "2511.03156", "2025"),
    Paper("reimagen_interleaved_cfg", "guidance", "Re-Imagen: Retrieval-Augmented Text-to-Image Generator", 2023, "2209.14491", "ICLR 2023"),
    Paper("repa_representation_alignment", "guidance", "Representation Alignment for Generation: Training Diffusion Transformers Is Easier Than You Think", 2025, "2410.06940", "ICLR 2025"),
    Paper("rlg_rl_guidance", "guidance", "Inference-Time Alignment Control for Diffusion Models with Reinforcement Learning Guidance", 2025, "2508.21016", "2025"),
    Paper("sid_fewstep_zero_anti_cfg", "guidance", "Few-Step Diffusion via Score identity Distillation", 2025, "2505.12674", "2025"),
    Paper("alignment_discretion", "llm_alignment", "AI Alignment at Your Discretion", 2025, "2502.10441", "arXiv 2025"),
    Paper("alignment_safety_survey_2025", "llm_alignment", "Alignment and Safety in Large Language Models: Safety Mechanisms, Training Paradigms, and Emerging Challenges", 2025, "2507.19672", "arXiv 2025"),
    Paper("baichuan_alignment", "llm_alignment", "Baichuan Alignment Technical Report", 2024, "2410.14940", "arXiv 2024, technical report"),
    Paper("bco", "llm_alignment", "Binary Classifier Optimization for Large Language Model Alignment", 2024, "2404.04656", "arXiv 2024; revised version at ACL 2025"),
    Paper("deita_data_selection", "llm_alignment", "What Makes Good Data for Alignment? A Comprehensive Study of Automatic Data Selection in Instruction Tuning", 2024, "2312.15685", "ICLR 2024"),
    Paper("isa_data_sampling", "llm_alignment", "Efficient Alignment of Large Language Models via Data Sampling", 2024, "2411.10545", "arXiv 2024"),
    Paper("llm_alignment_survey_outer_inner", "llm_alignment", "Large Language Model Alignment: A Survey", 2023, "2309.15025", "arXiv 2023"),
    Paper("min_tuning_long_output", "llm_alignment", "Minimum Tuning to Unlock Long Output from LLMs with High Quality Data as the Key", 2024, "2410.10210", "arXiv 2024, ModelScope report"),
    Paper("mllm_alignment_survey", "llm_alignment", "Aligning Multimodal LLM with Human Preference: A Survey", 2025, "2503.14504", "arXiv 2025"),
    Paper("oneshot_safety_dualization", "llm_alignment", "One-Shot Safety Alignment for Large Language Models via Optimal Dualization", 2024, "2405.19544", "NeurIPS 2024, spotlight"),
    Paper("p_aligner", "llm_alignment", "P-Aligner: Enabling Pre-Alignment of Language Models via Principled Instruction Synthesis", 2025, "2508.04626", "arXiv 2025"),
    Paper("poft", "llm_alignment", "Preference-Oriented Supervised Fine-Tuning: Favoring Target Model Over Aligned Large Language Models", 2024, "2412.12865", "arXiv 2024"),
    Paper("repe_tradeoff", "llm_alignment", "Tradeoffs Between Alignment and Helpfulness in Language Models with Representation Engineering", 2024, "2401.16332", "arXiv 2024; later revision titled '... with Steering Methods'"),
    Paper("targeting_alignment", "llm_alignment", "Targeting Alignment: Extracting Safety Classifiers of Aligned LLMs", 2026, "2501.16534", "IEEE SaTML 2026; arXiv 2025"),
    Paper("cafa_tta", "representation", "CAFA: Class-Aware Feature Alignment for Test-Time Adaptation", 2022, "2206.00205", "arXiv 2022, ICCV 2023"),
    Paper("clam", "representation", "End-to-end Differentiable Clustering with Associative Memories", 2023, "2306.03209", "ICML 2023"),
    Paper("fedloge", "representation", "FedLoGe: Joint Local and Generic Federated Learning under Long-tailed Data", 2024, "2401.08977", "ICLR 2024"),
    Paper("fedsa_semantic_anchors", "representation", "FedSA: A Unified Representation Learning via Semantic Anchors for Prototype-based Federated Learning", 2025, "2501.05496", "AAAI 2025"),
    Paper("hessian_alignment_dg", "representation", "Understanding Hessian Alignment for Domain Generalization", 2023, "2308.11778", "ICCV 2023"),
    Paper("kd_norm_direction", "representation", "Improving Knowledge Distillation via Regularizing Feature Norm and Direction", 2023, "2305.17007", "arXiv 2023"),
    Paper("lmc_weight_matching", "representation", "Analysis of Linear Mode Connectivity via Permutation-Based Weight Matching", 2024, "2402.04051", "arXiv 2024, ICLR 2025 version with insights into other permutation search methods"),
    Paper("loki_frechet", "representation", "Geometry-Aware Adaptation for Pretrained Models", 2023, "2307.12226", "Loki, NeurIPS 2023"),
    Paper("nola_clip_dino", "representation", "CLIP meets DINO for Tuning Zero-Shot Classifier using Unlabeled Image Collections", 2024, "2411.19346", "NoLA, arXiv 2024"),
    Paper("rcal_noisy_longtail", "representation", "When Noisy Labels Meet Long Tail Dilemmas: A Representation Calibration Method", 2022, "2211.10955", "RCAL, arXiv 2022 / ICCV 2023"),
    Paper("sbcl", "representation", "Subclass-balancing Contrastive Learning for Long-tailed Recognition", 2023, "2306.15925", "SBCL, ICCV 2023"),
    Paper("slca", "representation", "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a Pre-trained Model", 2023, "2303.05118", "ICCV 2023"),
    Paper("stationary_dsimplex", "representation", "Stationary Representations: Optimally Approximating Compatibility and Implications for Improved Model Replacements", 2024, "2405.02581", "CVPR 2024"),
    Paper("awp_ctc", "cross_modal", "Align With Purpose: Optimize Desired Properties in CTC Models with a General Plug-and-Play Framework", 2023, "2307.01715", "AWP, arXiv 2023 / ICLR 2024"),
    Paper("conala_mining", "cross_modal", "Learning to Mine Aligned Code and Natural Language Pairs from Stack Overflow", 2018, "1805.08949", "CoNaLa mining, MSR 2018"),
    Paper("noc_noise_aware_captioning", "cross_modal", "Noise-aware Learning from Web-crawled Image-Text Data for Image Captioning", 2022, "2212.13563", "NoC, arXiv 2022 / ICCV 2023"),
    Paper("sinhala_english_alignment", "cross_modal", "Sinhala-English Word Embedding Alignment: Introducing Datasets and Benchmark for a Low Resource Language", 2023, "2311.10436", "arXiv 2023"),
]

# Overview notebooks: not papers, but run, tested and listed like them.
_OVERVIEWS = [
    Paper("guidance_playground", "guidance", "Guidance playground: every rule in alignlab.guidance on one model", None,
          None, "overview", kind="overview"),
]

# Reproduced notebooks (and overviews) and the figure each one's gallery row shows.
_REPRODUCED = {
    "bco": "win_rates",
    "poft": "curves_by_noise",
    "slca": "lr_sweep",
    "llm_alignment_survey_outer_inner": "outer_alignment_comparison",
    "apg_adaptive_projected_guidance": "saturation_vs_scale",
    "dynamic_cfg_online_feedback": "pareto_accuracy_fd",
    "ezaudio_cfg_rescale": "metrics_vs_scale",
    "flowdirector_flow_steering_edit": "success_vs_background",
    "gfcg_gradient_free_classifier_guidance": "accuracy_vs_fd",
    "guidance_playground": "rules_vs_scale",
    "harmony_synccfg": "sync_vs_guidance",
    "oneshot_safety_dualization": "frontier",
    "hmcfg_hypernetwork_personalization": "identity_vs_alignment",
    "reimagen_interleaved_cfg": "tradeoff_vs_ratio",
    "rlg_rl_guidance": "reward_vs_w",
    "cafa_tta": "error_vs_severity",
    "sinhala_english_alignment": "p_at_1_by_dictionary",
    "clam": "silhouette_by_dataset",
    "conala_mining": "pr_curves",
    "lmc_weight_matching": "barrier_and_alignment",
    "awp_ctc": "latency_vs_error",
    "noc_noise_aware_captioning": "accuracy_by_bucket",
    "kd_norm_direction": "norm_and_accuracy",
}

PAPERS: dict[str, Paper] = {
    p.slug: (Paper(**{**p.__dict__, "status": "reproduced", "main_figure": _REPRODUCED[p.slug]})
             if p.slug in _REPRODUCED else p)
    for p in _PAPERS + _OVERVIEWS
}


def get(slug: str) -> Paper:
    """The paper with this exact slug; an unknown slug raises ValueError naming the near matches."""
    if slug in PAPERS:
        return PAPERS[slug]
    raise ValueError(f"unknown paper slug {slug!r}; {_near(slug)}")


def resolve(name: str) -> Paper:
    """A slug or a unique prefix of one (`apg` -> apg_adaptive_projected_guidance)."""
    if name in PAPERS:
        return PAPERS[name]
    hits = [s for s in PAPERS if s.startswith(name)]
    if len(hits) == 1:
        return PAPERS[hits[0]]
    if hits:
        raise ValueError(f"{name!r} is ambiguous; it starts {len(hits)} slugs: {', '.join(sorted(hits))}")
    raise ValueError(f"no paper matches {name!r}; {_near(name)}")


def _near(name: str) -> str:
    def score(slug: str) -> float:  # compare with the whole slug and with its head of the same length
        return max(difflib.SequenceMatcher(None, name, slug).ratio(),
                   difflib.SequenceMatcher(None, name, slug[: len(name) + 1]).ratio())

    close = [s for s in sorted(PAPERS, key=score, reverse=True)[:5] if score(s) >= 0.6]
    return f"did you mean: {', '.join(close)}?" if close else "see `alignlab list` for all slugs"
