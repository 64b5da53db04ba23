"""A model job that was given a GPU and cannot see CUDA stops at once, naming the node and the torch build, instead of
running on the CPU until its GPU-sized time limit ends it."""

from __future__ import annotations

import socket

import pytest
import torch

from neuronatlas.core import models
from neuronatlas.core.errors import NeuronAtlasError

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a node without a usable CUDA device")


@pytest.mark.parametrize(
    ("env", "grant"),
    [
        ({}, None),
        ({"SLURM_GPUS_ON_NODE": "1"}, "SLURM_GPUS_ON_NODE=1"),
        ({"SLURM_GPUS": "a100:1"}, "SLURM_GPUS=a100:1"),
        ({"SLURM_GPUS": "a100:0", "SLURM_GPUS_ON_NODE": "0"}, None),
        ({"SLURM_JOB_GPUS": "0,1"}, "SLURM_JOB_GPUS=0,1"),
        ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),
        ({"CUDA_VISIBLE_DEVICES": ""}, None),  # the usual way to hide every GPU
        ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),
    ],
)
def test_the_scheduler_variables_that_give_a_job_a_gpu(env, grant):
    assert models.granted_gpu(env) == grant


def test_a_job_given_a_gpu_without_cuda_stops_naming_the_node_and_torch_build():
    with pytest.raises(NeuronAtlasError) as err:
        models.resolve_device("auto", {"SLURM_GPUS_ON_NODE": "1"})
    text = str(err.value)
    assert socket.gethostname() in text and torch.__version__ in text and "SLURM_GPUS_ON_NODE=1" in text
    assert ("CPU-only build" in text) if torch.version.cuda is None else (f"CUDA {torch.version.cuda}" in text)
    with pytest.raises(NeuronAtlasError, match="device: cuda"):
        models.resolve_device("cuda", {})


def test_without_a_gpu_or_with_the_fallback_set_auto_runs_on_the_cpu(capsys):
    assert models.resolve_device("auto", {}) == torch.device("cpu")
    fallback = {"SLURM_GPUS_ON_NODE": "1", models.CPU_FALLBACK_VARIABLE: "1"}
    assert models.resolve_device("auto", fallback) == torch.device("cpu")
    assert "running on the CPU" in capsys.readouterr().err  # said in the job's log
