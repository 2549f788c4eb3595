"""The jobs: the queue, the supervisor, the workers (training, live, prediction), their shared lifecycle and how
a job ends."""
