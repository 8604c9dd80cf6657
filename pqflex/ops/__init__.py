"""Math on tensors: a plain-torch reference for every op (``reference``); fast kernels register beside it."""
