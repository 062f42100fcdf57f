# imds-proxy as a container, DaemonSet-style: one static binary, and the CA bundle it needs to
# reach STS over HTTPS. Nothing else: no shell, no package manager.
#
# Build with `cargo xtask build --image`: it builds the static (musl) binary, whose build also
# compiles and embeds the eBPF programs, and runs `docker build -f Dockerfile` on a context holding
# just that binary and the host's CA bundle. Run it privileged on the host network, with the host's
# cgroup hierarchy, bpffs and Docker socket:
#
#   docker run -d --name imds-proxy --privileged --network host --cgroupns host \
#     -v /sys/fs/cgroup:/sys/fs/cgroup -v /sys/fs/bpf:/sys/fs/bpf \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     imds-proxy:latest run --pin /sys/fs/bpf/imds-proxy \
#       --role-arn-prefix arn:aws:iam::<account>:role/containers/ --default-role DefaultRole
#
# Its own cgroup is exempt from the redirect, so its requests to the real IMDS are not redirected.
FROM scratch
COPY imds-proxy /imds-proxy
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENTRYPOINT ["/imds-proxy"]
CMD ["run"]
