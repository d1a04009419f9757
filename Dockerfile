# kart_lightning on a CUDA PyTorch base. The Super Mario Kart ROM is never part of the image:
# mount your ROM folder and import it (see README), e.g.
#   docker build -t kart_lightning .
#   docker run --gpus all -p 6006:6006 -v $PWD/checkpoints:/app/checkpoints kart_lightning fit
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY kart_lightning ./kart_lightning
COPY configs ./configs
RUN pip install --no-cache-dir -e . && mkdir -p checkpoints

# TensorBoard: docker run ... tensorboard --logdir lightning_logs --bind_all
EXPOSE 6006
ENTRYPOINT ["python", "-m", "kart_lightning"]
CMD ["fit"]
