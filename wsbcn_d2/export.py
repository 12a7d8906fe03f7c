"""Export a trained WS / BCN detector to ONNX or TorchScript, through detectron2's tracing adapter.

The model is first folded (:func:`wsbcn_d2.fold_for_inference`): WS convs become
plain convs holding their standardized weights, BCN's batch step (fixed at
inference) is folded into the conv that carries it, or into a frozen
per-channel affine where the BCN is not a conv's norm (RetinaNet's per-level
head norms), and what remains of BCN is a group normalization with a
per-group affine. The graph then holds no custom op, at opset 17. Group norms
are written as :class:`ExportGroupNorm` (``ReduceMean`` and ``MatMul``\ s with
constant group-averaging matrices) rather than torch's ``Reshape(N, G, -1)`` +
``InstanceNormalization`` pattern, which onnxruntime cannot run on a batch of 0:
the mask head's batch whenever nothing is detected. (``GroupNormalization``
is no alternative: its opset-18 version takes a per-group affine that opset 21
replaced, and older runtimes and TensorRT lack it.)

As detectron2's ``tools/deploy/export_model.py``, models return their detections
before the final resize to the original image: boxes in the network input's
coordinates, masks (R-CNN) as per-RoI probabilities. The graph is traced on one
sample; the ONNX graph takes images of any height and width (its input's
dimensions 1 and 2 are dynamic), and so does the TorchScript one.
"""
import io
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import onnxruntime
import torch
from detectron2.export import TracingAdapter
from detectron2.modeling import GeneralizedRCNN, PanopticFPN, RetinaNet
from detectron2.structures import Boxes, Instances
from torch import nn

from .checkpoint import atomic_write
from .layers import BatchChannelNorm2d, WSConv2d
from .modeling import fold_for_inference

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_OPSET",
    "DetectionDifference",
    "ExportError",
    "ExportGroupNorm",
    "compare_detections",
    "export",
    "inference_function",
    "load_exported",
    "onnx_op_types",
    "pair_detections",
    "tracing_adapter",
]

ONNX_OPSET = 17
EXPORT_FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
"""Format -> the file :func:`export` writes in its output folder."""


class ExportError(ValueError):
    """The model cannot be exported as asked (its meta-architecture, a layer that does not fold)."""


class ExportGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and function) in operations that trace to a graph taking a batch of 0.

    Each channel's mean over H x W, averaged over its group (a (C, G) matrix of 1 / (C / G) at each channel's
    group) and given back to the group's channels (its 0/1 transpose), is the group's mean; the variance
    likewise, of the centred input (two passes, as ``F.group_norm``):
    ``y = (x - mean_g) / sqrt(var_g + eps) * weight + bias``. No reshape of the batch dimension; the graph
    holds the two small matrices per group norm as constants.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_group = self.num_channels // self.num_groups
        group = torch.arange(self.num_channels, device=x.device) // per_group
        member = (group[:, None] == torch.arange(self.num_groups, device=x.device)[None, :]).to(x.dtype)  # (C, G)
        average, spread = member / per_group, member.t()

        def group_mean(per_channel: torch.Tensor) -> torch.Tensor:  # (N, C) -> (N, C, 1, 1)
            return (per_channel @ average @ spread)[:, :, None, None]

        centered = x - group_mean(x.mean(dim=(2, 3)))
        var = group_mean(centered.square().mean(dim=(2, 3)))
        return centered * torch.rsqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


def _rcnn_inference(model: GeneralizedRCNN, inputs: List[Dict[str, torch.Tensor]]) -> List[Dict[str, Instances]]:
    # before the final resize, as detectron2's export: boxes in the input's coordinates, RoI masks
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def _retinanet_inference(model: RetinaNet, inputs: List[Dict[str, torch.Tensor]]) -> List[Dict[str, Instances]]:
    # RetinaNet's forward without its final resize (which would bake the traced size into the graph)
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    return [{"instances": model.forward_inference(images, features, model.head(features))[0]}]


_INFERENCE: Dict[type, Callable] = {GeneralizedRCNN: _rcnn_inference, RetinaNet: _retinanet_inference}
"""Meta-architecture -> its inference function for tracing."""


def inference_function(model: nn.Module) -> Callable:
    """What :class:`TracingAdapter` calls to trace ``model``.

    Raises:
        ExportError: the meta-architecture is not an R-CNN or RetinaNet.
    """
    supported = [cls for cls in _INFERENCE if isinstance(model, cls)]
    if not supported or isinstance(model, PanopticFPN):  # an R-CNN subclass whose outputs add segmentations
        raise ExportError(
            f"{type(model).__name__} cannot be exported: the export supports GeneralizedRCNN and RetinaNet "
            "models (and their subclasses: Cascade R-CNN, WSRetinaNet)"
        )
    return _INFERENCE[supported[0]]


def tracing_adapter(model: nn.Module, image: torch.Tensor, fold: bool = True) -> TracingAdapter:
    """detectron2's :class:`TracingAdapter` around ``model`` (folded, with :class:`ExportGroupNorm` group norms,
    unless ``fold`` is False), in eval.

    ``image``: a (3, H, W) network input (already resized). The adapter maps it to the
    flattened detections (see :func:`compare_detections`).

    Raises:
        ExportError: the meta-architecture is not an R-CNN or RetinaNet, or a WS / BCN layer
            remains after folding.
    """
    inference = inference_function(model)
    if fold:
        model = fold_for_inference(model)
        left = [name for name, m in model.named_modules() if isinstance(m, (WSConv2d, BatchChannelNorm2d))]
        if left:
            raise ExportError(
                f"{len(left)} WS / BCN layers did not fold into plain layers ({', '.join(left[:3])}): a BCN "
                "without running statistics has no inference form to export"
            )
        for m in model.modules():  # the folded model is a copy
            if type(m) is nn.GroupNorm:
                m.__class__ = ExportGroupNorm
    return TracingAdapter(model.eval(), [{"image": image}], inference).eval()


def onnx_op_types(model_proto) -> Dict[str, set]:
    """Op types of an ONNX model by domain ("" is the standard ONNX domain), subgraphs included."""
    ops: Dict[str, set] = {}

    def visit(graph) -> None:
        for node in graph.node:
            ops.setdefault(node.domain, set()).add(node.op_type)
            for attribute in node.attribute:  # If / Loop bodies
                for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    visit(subgraph)

    visit(model_proto.graph)
    return ops


def export(adapter: TracingAdapter, image: torch.Tensor, fmt: str, output_dir: str) -> str:
    """Trace ``adapter`` on ``image`` and write it as ``fmt`` (:data:`EXPORT_FORMATS`) into ``output_dir``,
    atomically; returns the file's path."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, EXPORT_FORMATS[fmt])
    buffer = io.BytesIO()
    with torch.no_grad():
        if fmt == "onnx":
            torch.onnx.export(
                adapter, (image,), buffer, opset_version=ONNX_OPSET, dynamo=False, input_names=["image"],
                dynamic_axes={"image": {1: "height", 2: "width"}},
            )  # fmt: skip
        else:
            torch.jit.save(torch.jit.trace(adapter, (image,)), buffer)
    with atomic_write(path, "wb") as f:
        f.write(buffer.getvalue())
    return path


def load_exported(path: str) -> Callable[[torch.Tensor], Sequence[torch.Tensor]]:
    """The exported model at ``path`` as ``image -> flattened outputs``: onnxruntime (CPU) for ``.onnx``,
    ``torch.jit.load`` for ``.ts``."""
    if path.endswith(".onnx"):
        ort_model = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda image: [torch.from_numpy(o) for o in ort_model.run(None, {"image": image.numpy()})]
    module = torch.jit.load(path)
    return lambda image: module(image)


@dataclass
class DetectionDifference:
    """How far two sets of detections of one image are apart."""

    counts: tuple
    """Detections in each."""
    boxes: float = 0.0
    scores: float = 0.0
    unpaired: int = 0
    """Detections of the first without a counterpart in the second (see :func:`pair_detections`)."""
    masks: float = 0.0


def _fields(instances: Instances) -> Dict[str, torch.Tensor]:
    fields = {k: v.tensor if isinstance(v, Boxes) else v for k, v in instances.get_fields().items()}
    return {k: v.detach().float() if v.is_floating_point() else v for k, v in fields.items()}


def pair_detections(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], within: float = 1e-2):
    """Pair each detection of ``a`` with the detection of ``b`` of the same class whose box is nearest (largest
    coordinate difference), where that is below ``within`` pixels and no other detection of ``a`` takes it.

    Two runtimes order near-equal scores differently (an untrained model's are all alike), so detections are
    matched by box, not by rank. ``a`` and ``b``: Instances fields (``pred_boxes`` as a tensor). Returns a mask
    over ``a`` (paired) and, for each detection of ``a``, the index of its nearest in ``b``.
    """
    n, m = len(a["pred_boxes"]), len(b["pred_boxes"])
    if not (n and m):
        return torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long)
    distance = (a["pred_boxes"][:, None].double() - b["pred_boxes"][None].double()).abs().amax(dim=2)
    distance[a["pred_classes"][:, None] != b["pred_classes"][None]] = float("inf")
    nearest, index = distance.min(dim=1)
    paired = nearest < within
    takers = torch.bincount(index[paired], minlength=m)  # detections of a that chose each of b
    return paired & (takers[index] == 1), index


def compare_detections(
    adapter: TracingAdapter, got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]
) -> DetectionDifference:
    """Detections of two flattened outputs of ``adapter`` (e.g. an exported model's and PyTorch's), paired by
    :func:`pair_detections`: the unpaired count, and the max absolute differences of boxes, scores and masks
    over the pairs."""
    a, b = (_fields(adapter.outputs_schema(list(o))[0]["instances"]) for o in (got, expected))
    diff = DetectionDifference(counts=(len(a["scores"]), len(b["scores"])))
    paired, index = pair_detections(a, b)
    diff.unpaired = int((~paired).sum())
    if paired.any():
        pairs = {k: (a[k][paired], b[k][index[paired]]) for k in ("pred_boxes", "scores", "pred_masks") if k in a}
        diff.boxes, diff.scores = ((x - y).abs().max().item() for x, y in (pairs["pred_boxes"], pairs["scores"]))
        if "pred_masks" in pairs:
            diff.masks = (pairs["pred_masks"][0] - pairs["pred_masks"][1]).abs().max().item()
    return diff
