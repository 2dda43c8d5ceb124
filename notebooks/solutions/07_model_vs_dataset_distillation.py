"""Reference solutions for notebooks/07_model_vs_dataset_distillation.ipynb."""

import torch.nn.functional as F


def kd_loss(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
    """(1 - alpha) CE(s, y) + alpha T^2 KL(softmax(t / T) || softmax(s / T)), batch-mean KL.

    student_logits, teacher_logits: ``[b, classes]``; labels: int64 ``[b]``.
    """
    hard = F.cross_entropy(student_logits, labels)
    p = F.softmax(teacher_logits.detach() / T, dim=1)  # the teacher's softened targets
    log_p = F.log_softmax(teacher_logits.detach() / T, dim=1)
    log_q = F.log_softmax(student_logits / T, dim=1)  # the student's softened log-probabilities
    # KL(p || q) = sum_k p_k (log p_k - log q_k), averaged over the batch
    kl = (p * (log_p - log_q)).sum(dim=1).mean()
    return (1 - alpha) * hard + alpha * T**2 * kl
