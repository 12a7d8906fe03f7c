# wsbcn_d2: `make demo` (main job) and `make test`; both set up .venv/ first when needed.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.wsbcn_d2-setup

.PHONY: setup demo test gpu-check
setup: $(STAMP)

# Re-run the set-up when the venv is missing or its recipe changed.
$(STAMP): setup.py tools/setup_env.sh
	bash tools/setup_env.sh
	touch $@

DEMO_CONFIG := configs/Demo/mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml
DEMO_OUT    := output/demo
# the GPU when there is one (evaluated after the set-up, when the demo runs)
DEMO_DEVICE = $(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUT) MODEL.DEVICE $(DEMO_DEVICE)
	$(PY) tools/visualize_predictions.py --config-file $(DEMO_CONFIG) --output $(DEMO_OUT)/predictions \
		MODEL.WEIGHTS $(DEMO_OUT)/model_final.pth MODEL.DEVICE $(DEMO_DEVICE)
	@echo "Demo outputs in $(DEMO_OUT): model_final.pth, metrics.json, events.out.tfevents.*," \
		"inference/ (COCO results), predictions/*.png (ground truth | prediction)"

# The suite under this CPU's own kernels, then its float32 comparisons under torch's portable ones
# (ATEN_CPU_CAPABILITY=default, 1 thread): a tolerance must hold on any x86 CPU (docs/testing.md).
test: $(STAMP)
	$(PY) -m pytest tests -q
	$(PY) tests/numerics_sweep.py --capabilities default --threads 1

# On a CUDA machine: kernel tests compiled, benchmark tables in docs/gpu/ (tools/gpu_check.sh).
gpu-check: $(STAMP)
	PYTHON=$(PY) bash tools/gpu_check.sh
