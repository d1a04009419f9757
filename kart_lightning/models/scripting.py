"""The scripted policy as bytes and back: how it travels to actor, evaluation and recording
processes and to the learner's inference server."""

import io

import torch


def script_bytes(policy: torch.jit.ScriptModule) -> bytes:
    """`policy` as the bytes of a TorchScript file whose tensors are on the CPU, so that it loads
    anywhere (a CUDA learner's policy included)."""
    buffer = io.BytesIO()
    torch.jit.save(policy, buffer)
    buffer.seek(0)
    cpu_policy = torch.jit.load(buffer, map_location="cpu")
    cpu_policy.eval()
    buffer = io.BytesIO()
    torch.jit.save(cpu_policy, buffer)
    return buffer.getvalue()


def load_script(data: bytes, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """The policy `script_bytes` wrote, on `device`, in eval mode."""
    policy = torch.jit.load(io.BytesIO(data), map_location=device)
    policy.eval()
    return policy
