# Mask R-CNN R-50-FPN with micro-batch BCN+WS in every conv tower, as a LazyConfig for
# tools/lazyconfig_train_net.py: the model and schedule of mask_rcnn_R_50_FPN_2x_bcn_ws.yaml
# (8 images per iteration, 2 per GPU on 4 GPUs: --num-gpus 4; LR 0.01; the paper's "2x",
# 360000 iterations), built from detectron2's common Mask R-CNN config.
# train.init_checkpoint is the official ImageNet BCN+WS backbone converted with
#   python tools/convert_pretrained.py rn50_bcn_ws.pth pretrained/rn50_bcn_ws.pkl
# Set train.init_checkpoint="" and model.backbone.bottom_up.freeze_at=0 to train from scratch.
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from wsbcn_d2.layers import resolve_norm
from wsbcn_d2.modeling import build_ws_model

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
optimizer = model_zoo.get_config("common/optim.py").SGD
train = model_zoo.get_config("common/train.py").train

# WS on every conv that carries a norm: build_ws_model builds the meta-architecture, then standardizes
model.meta_arch = "detectron2.modeling.GeneralizedRCNN"
model._target_ = build_ws_model
model.ws_form = "var+eps"  # the official BCN+WS ImageNet models' WS: (W - mean) / sqrt(var + eps)
model.ws_eps = 1e-5

# micro-batch BCN in every norm slot (NormOptions' defaults: 32 groups, eps 1e-5, update rate 0.1)
bcn = L(resolve_norm)(norm="BCN")
model.backbone.bottom_up.stem.norm = bcn
model.backbone.bottom_up.stages.norm = bcn
model.backbone.norm = bcn
model.roi_heads.box_head.conv_norm = bcn
model.roi_heads.mask_head.conv_norm = bcn

# the official WS code's settings (configs/Base-WSBCN-RCNN-FPN.yaml)
model.backbone.bottom_up.freeze_at = 2
model.backbone.bottom_up.stages.stride_in_1x1 = False
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]  # 4conv1fc
model.roi_heads.box_head.fc_dims = [1024]
model.pixel_mean = [123.675, 116.28, 103.53]  # RGB, torchvision's mean/std: the backbones' ImageNet input
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 8  # images per optimizer step, over all processes
train.accumulation_steps = 1  # forwards per step: 2 on 2 GPUs, 4 on one, train with the 4-GPU batch

train.init_checkpoint = "pretrained/rn50_bcn_ws.pkl"
train.max_iter = 360000
optimizer.lr = 0.01
optimizer.params.base_lr = "${..lr}"
optimizer.params.bias_lr_factor = 2.0
optimizer.params.weight_decay_bias = 0.0
optimizer.params.weight_decay_norm = 1e-4
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[300000, 340000], num_updates=train.max_iter
    ),
    warmup_length=500 / train.max_iter,
    warmup_factor=1 / 3,
)
