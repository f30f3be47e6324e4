"""ms-swift trainers for PIPO SFT and OPD (found through `TrainerFactory.TRAINER_MAPPING`).

The losses live here, not in the model's forward: ms-swift drops `labels` before the
forward in several paths (loss scaling, loss types, sequence parallel), and a loss
computed inside forward would silently vanish. Both trainers still call the model
through `forward`, so DDP / DeepSpeed wrappers see a regular forward pass.
"""
from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch
from peft import PeftModel
from swift.rlhf_trainers import GKDTrainer
from swift.template import TemplateInputs
from swift.trainers import Seq2SeqTrainer
from swift.utils import remove_response
from transformers import TrainerCallback

from pipo.errors import PIPOError
from pipo.model.modeling import PIPOForCausalLM
from pipo.model.pairs import collate_rows, pad_augment_batch, rollout_row
from pipo.model.sampling import SamplingParams
from pipo.provenance import exit_after_steps_for_test
from pipo.train.opd import compact_pads, opd_losses
from pipo.train.student_rollout import RolloutEngine, generate_rollouts
from pipo.train.settings import TrainSettings
from pipo.train.tracking_callback import MLflowMetricsCallback
from pipo.train.validation import check_teacher_tokenizer

ROLLOUT_PROMPT = "pipo_prompt_ids"  # where a rollout keeps the prompt ids it was generated from
SFT_METRICS = ("backbone_loss", "mtp_loss", "conf_loss", "conf_mean_pred", "conf_mean_target")
OPD_METRICS = {
    "backbone_loss": "opd_backbone_loss",
    "mtp_loss": "opd_mtp_loss",
    "conf_loss": "opd_conf_loss",
    "conf_mean_pred": "opd_conf_mean_pred",
    "conf_mean_target": "opd_conf_mean_target",
}


class ExitAfterStepsForTest(TrainerCallback):
    """The kill hook of the resume tests (`PIPO_TEST_EXIT_AFTER_STEPS`); does nothing without the variable."""

    def on_step_end(self, args, state, control, **kwargs) -> None:
        exit_after_steps_for_test(state.global_step)


def pipo_module(model: torch.nn.Module, accelerator) -> PIPOForCausalLM:
    """The `PIPOForCausalLM` inside DDP / DeepSpeed / PEFT wrappers (LoRA layers stay active in it)."""
    inner = accelerator.unwrap_model(model)
    if isinstance(inner, PeftModel):
        inner = inner.base_model.model
    if not isinstance(inner, PIPOForCausalLM):
        raise PIPOError(
            f"the PIPO trainers need a PIPO model, got {type(inner).__name__}; pass --model_type pipo_qwen3_5 or pipo_tiny"
        )
    return inner


def step_seed(seed: int, step: int, rank: int, micro_step: int) -> int:
    """A seed derived from (seed, step, rank, micro-step): reproducible, and unchanged by a resume."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) * 10_007 + micro_step


def step_generator(seed: int, step: int, rank: int, micro_step: int) -> torch.Generator:
    """A CPU generator seeded with `step_seed`."""
    return torch.Generator().manual_seed(step_seed(seed, step, rank, micro_step))


class PIPOSFTTrainer(Seq2SeqTrainer):
    """SFT (docs/method.md section 4): PAD augmentation drawn per micro-batch, `pipo_losses`, component metrics.

    The thinking prefix is masked by construction: the PIPO templates put it in the
    generation prompt, so it is never a label.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pipo_settings = TrainSettings.from_env()
        self.pad_id = pipo_module(self.model, self.accelerator).pad_token_id
        if self.template.padding_free or self.template.packing:
            raise PIPOError("PIPO SFT does not support --padding_free / --packing: pairs must not straddle rows")
        self.model_accepts_loss_kwargs = False  # our loss is a mean: let the Trainer divide by grad accumulation
        self._micro_step = (-1, 0)
        self.add_callback(MLflowMetricsCallback())
        self.add_callback(ExitAfterStepsForTest())

    def _pad_generator(self) -> torch.Generator:
        step = self.state.global_step
        micro = self._micro_step[1] + 1 if self._micro_step[0] == step else 0
        self._micro_step = (step, micro)
        return step_generator(self.pipo_settings.pad_seed, step, self.accelerator.process_index, micro)

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        settings = self.pipo_settings
        ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs["attention_mask"]
        if model.training and settings.max_pad_ratio > 0:
            ids, labels, mask, _ = pad_augment_batch(ids, labels, mask, self.pad_id, settings.max_pad_ratio, self._pad_generator())
        out = model(
            input_ids=ids,
            attention_mask=mask,
            labels=labels,
            mtp_weight=settings.mtp_weight,
            conf_weight=settings.conf_weight,
            chunk_size=settings.chunk_size,
        )
        metrics = self.custom_metrics["train" if model.training else "eval"]
        for name in SFT_METRICS:
            metrics[name].update(getattr(out, name).detach())
        return (out.loss, {"loss": out.loss}) if return_outputs else out.loss


class PIPOOPDTrainer(GKDTrainer):
    """On-policy distillation (docs/method.md section 5) on top of ms-swift's GKD loop.

    Rollouts use PIPO decoding (`generate_rollouts`, confidence threshold from the
    settings) through one `RolloutEngine` kept for the whole run; the teacher runs on
    PAD-compacted sequences; the student runs the compressed forward with the rollout's
    token1 teacher-forcing the MTP head; the divergence is `sampled`, `topk` or `full` (JSD with `--beta`).
    """

    def __init__(self, model=None, *args, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        self.pipo_settings = TrainSettings.from_env()
        student = pipo_module(self.model, self.accelerator)
        self.pad_id = student.pad_token_id
        if self.teacher_model is None:
            raise PIPOError("PIPO OPD needs a local teacher: pass --teacher_model (teacher servers are not supported)")
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        check_teacher_tokenizer(student.model_dir, teacher.model_dir)
        student_vocab = student.get_output_embeddings().weight.shape[0]
        teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
        if student_vocab != teacher_vocab:
            raise PIPOError(
                f"teacher {teacher.model_dir} has {teacher_vocab} output rows but student "
                f"{student.model_dir} has {student_vocab}: OPD needs one shared vocabulary"
            )
        self.model_accepts_loss_kwargs = False
        self.rollout_engine = RolloutEngine()  # built at the first rollout, its CUDA graphs reused by every later one
        self.add_callback(MLflowMetricsCallback())
        self.add_callback(ExitAfterStepsForTest())

    # ------------------------------------------------------------------ rollouts
    def _prompt_ids(self, sample) -> list[int]:
        """The generation prompt of a sample (response removed), padded to even by the template."""
        row = deepcopy(sample.to_template_dict())
        remove_response(row["messages"])
        with self.template.generate_context():
            return self.template.encode(TemplateInputs.from_dict(row))["input_ids"]

    def _generate_completions(self, samples):
        """Student rollouts with PIPO decoding; the raw slots (PADs included) are kept for training."""
        samples = self._preprocess_inputs(samples)
        settings = self.pipo_settings
        params = SamplingParams(
            temperature=self.args.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            presence_penalty=settings.presence_penalty,
        )
        seed = step_seed(self.args.seed, self.state.global_step, self.accelerator.process_index, 0)
        eos = [self.template.tokenizer.eos_token_id, self.template.template_meta.stop_token_id]
        prompts = [self._prompt_ids(s) for s in samples]
        results = generate_rollouts(
            pipo_module(self.model, self.accelerator),
            prompts,
            self.args.max_completion_length,
            params,
            settings.conf_threshold,
            [t for t in eos if t is not None],
            seed,
            engine=self.rollout_engine,
        )
        for sample, prompt, result in zip(samples, prompts, results):
            sample.rollout_infos[ROLLOUT_PROMPT] = prompt
            sample.messages.append({"role": "assistant", "content": self.template.tokenizer.decode(result.token_ids)})
            sample.response_token_ids = [result.raw_ids]
            sample.finish_reason = "stop" if result.finished else "length"
            sample.add_eos = False
        return samples

    def _encode_row(self, sample) -> tuple[list[int], list[int]]:
        """A rollout as prompt + raw slots, or a dataset row (off-policy branch) through the template."""
        if sample.response_token_ids:
            return rollout_row(sample.rollout_infos[ROLLOUT_PROMPT], sample.response_token_ids[0], self.pad_id)
        encoded = self.template.encode(TemplateInputs.from_dict(sample.to_template_dict()))
        return encoded["input_ids"], encoded["labels"]

    def _prepare_batch_inputs(self, samples) -> list[dict[str, Any]]:
        """Per micro-batch: the student batch and its PAD-compacted teacher view."""
        batches = []
        for chunk in self.split_by_mini_batches(samples):
            batch = {k: v.to(self.accelerator.device) for k, v in collate_rows([self._encode_row(s) for s in chunk], self.pad_id).items()}
            batches.append({"model_inputs": batch, "compact": compact_pads(batch["input_ids"], batch["attention_mask"], self.pad_id)})
        return batches

    def _postprocess_batch(self, samples, batch_encoded_inputs) -> None:
        """Teacher signals come from the local teacher forward in `compute_loss`."""

    # ---------------------------------------------------------------------- loss
    @torch.no_grad()
    def _teacher_hidden(self, compact) -> torch.Tensor:
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        decoder = getattr(teacher, teacher.base_model_prefix)
        with self.load_teacher_model_context():
            out = decoder(input_ids=compact.input_ids, attention_mask=compact.attention_mask, use_cache=False)
        return out.last_hidden_state

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        settings = self.pipo_settings
        batch, compact = inputs["model_inputs"], inputs["compact"]
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_pair_states=True)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        out = opd_losses(
            student.hidden_states,
            student.mtp_hidden_states,
            student.confidence_logits,
            pipo_module(model, self.accelerator).lm_head.weight,
            self._teacher_hidden(compact),
            teacher.get_output_embeddings().weight,
            batch["labels"],
            compact.source_index,
            divergence=settings.divergence,
            k=settings.topk,
            beta=1.0 if self.args.beta is None else float(self.args.beta),
            mtp_weight=settings.mtp_weight,
            conf_weight=settings.conf_weight,
            chunk_size=settings.chunk_size,
            fill_rejected=settings.fill_rejected_drafts,
            pad_id=self.pad_id,
        )
        metrics = self.custom_metrics["train" if model.training else "eval"]
        for field, name in OPD_METRICS.items():
            metrics[name].update(getattr(out, field).detach())
        return (out.loss, {"loss": out.loss}) if return_outputs else out.loss


def register_trainers() -> None:
    """Point ms-swift's causal-LM SFT and GKD entries at the PIPO trainers."""
    from swift.trainers import TrainerFactory

    TrainerFactory.TRAINER_MAPPING["causal_lm"] = f"{__name__}.PIPOSFTTrainer"
    TrainerFactory.TRAINER_MAPPING["gkd"] = f"{__name__}.PIPOOPDTrainer"
