"""Fine-tuning with knowledge distillation from the uncompressed baseline.

alpha weighs the distillation term against plain cross-entropy (alpha 0 = plain
fine-tuning); temperature softens both distributions. Pruning masks are re-applied after
every optimizer step, so fine-tuning cannot regrow pruned weights.
"""

from __future__ import annotations

from paretoopt.compress.augment import Augment
from paretoopt.compress.techniques import Stage, register
from paretoopt.compress.techniques.bench import Workbench
from paretoopt.compress.train import Recipe, train
from paretoopt.config.plan import CompressionPlan


@register("distill", Stage.FINETUNE)
def distill(bench: Workbench, plan: CompressionPlan) -> None:
    ft = plan.finetune
    if ft.epochs == 0:
        return
    recipe = Recipe(
        epochs=ft.epochs,
        lr=ft.lr,
        batch_size=ft.batch_size,
        seed=bench.seed,
        temperature=plan.distill.temperature,
        alpha=plan.distill.alpha,
        augment=Augment(ft.mixup, ft.cutmix, bench.splits.transform),
        setup=bench.setup,
    )

    def after_step(step: int, total: int) -> bool:
        bench.apply_masks()  # fine-tuning must not regrow pruned weights on its own
        return any([hook(step, total) for hook in bench.step_hooks])

    with bench.on(bench.setup.device):  # gradual pruning's hooks see the model there
        losses = train(
            bench.model,
            bench.splits.train,
            recipe,
            teacher_logits=bench.teacher_logits,
            after_step=after_step,
            weight_view=bench.weight_view,
            step_guard=bench.step_guard,
        )
    bench.records["finetune_loss"] = [round(x, 5) for x in losses]
