# Packer template of the whist host AMI (HCL2; validated by host-setup/check.sh with the Debian
# packer 1.6). Build one AMI per environment and commit:
#
#   cargo build --release -p host-service --bin whist-host-service   # with WHIST_COMMIT set
#   packer build -var app_env=prod -var commit=$(git rev-parse HEAD) \
#     -var host_service_binary=$CARGO_TARGET_DIR/release/whist-host-service \
#     -var 'ami_regions=["us-west-1"]' \
#     -var 'mandelbox_images=["ghcr.io/whisthq/prod/browsers/chrome:<sha>"]' host-setup/ami.pkr.hcl
#
# GHCR credentials for the images come from PKR_VAR_ghcr_user / PKR_VAR_ghcr_token; they reach
# setup_host.sh through the environment and are removed from the image before it is captured.
# The manifest (packer-manifest.json) lists "region:ami" pairs: insert them into whist.images
# (docs/operations.md, "Upgrade the hosts").

variable "app_env" {
  type        = string
  description = "dev, staging or prod: the image names the host service resolves carry it"
  validation {
    condition     = contains(["dev", "staging", "prod"], var.app_env)
    error_message = "The app_env value must be dev, staging or prod."
  }
}

variable "commit" {
  type        = string
  description = "git commit of the host service binary (tags the AMI; the instance row's client_sha must prefix it)"
  validation {
    # Length only: packer 1.6 has no regex functions.
    condition     = length(var.commit) >= 7 && length(var.commit) <= 40
    error_message = "The commit value must be a git commit hash (7 to 40 characters)."
  }
}

variable "host_service_binary" {
  type        = string
  description = "path of the release build of whist-host-service"
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "ami_regions" {
  type        = list(string)
  default     = []
  description = "other regions the AMI is copied to"
}

variable "instance_types" {
  type        = list(string)
  default     = ["g4dn.xlarge", "g4dn.2xlarge"]
  description = "spot instance types to build on: a GPU type, so the driver is installed against real hardware"
}

variable "build_instance_profile" {
  type        = string
  default     = ""
  description = "instance profile of the build instance; it must be able to read s3://ec2-linux-nvidia-drivers"
}

variable "mandelbox_images" {
  type        = list(string)
  default     = []
  description = "images pre-pulled and tagged :current-build, e.g. ghcr.io/whisthq/prod/browsers/chrome:<sha>"
}

variable "ghcr_user" {
  type      = string
  default   = ""
  sensitive = true
}

variable "ghcr_token" {
  type      = string
  default   = ""
  sensitive = true
}

locals {
  build_time = formatdate("YYYYMMDDhhmmss", timestamp())
  short_sha  = substr(var.commit, 0, 7)
  pull_args  = join(" ", [for image in var.mandelbox_images : "--pull '${image}'"])
}

source "amazon-ebs" "host" {
  ami_name        = "whist-host-${var.app_env}-${local.short_sha}-${local.build_time}"
  ami_description = "whist host service ${var.commit} (${var.app_env})"
  region          = var.region
  ami_regions     = var.ami_regions

  source_ami_filter {
    filters = {
      name                = "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["099720109477"]
    most_recent = true
  }

  spot_instance_types  = var.instance_types
  spot_price           = "auto"
  iam_instance_profile = var.build_instance_profile
  ssh_username         = "ubuntu"
  ebs_optimized        = true

  launch_block_device_mappings {
    device_name           = "/dev/sda1"
    volume_size           = 64
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 250
    delete_on_termination = true
  }

  run_tags = {
    Name = "whist-ami-builder-${var.app_env}"
  }

  tags = {
    Name      = "whist-host-${var.app_env}-${local.short_sha}"
    AppEnv    = var.app_env
    Commit    = var.commit
    BuildTime = local.build_time
    SourceAMI = "{{ .SourceAMI }}"
    ManagedBy = "packer"
  }
}

build {
  sources = ["source.amazon-ebs.host"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/whist/host-setup"]
  }

  provisioner "file" {
    source      = "${path.root}/"
    destination = "/tmp/whist/host-setup"
  }

  provisioner "file" {
    source      = var.host_service_binary
    destination = "/tmp/whist/whist-host-service"
  }

  provisioner "shell" {
    environment_vars = [
      "GHCR_USER=${var.ghcr_user}",
      "GHCR_TOKEN=${var.ghcr_token}",
    ]
    execute_command = "chmod +x {{ .Path }}; sudo -E bash '{{ .Path }}'"
    inline = [
      "set -euo pipefail",
      "chmod +x /tmp/whist/whist-host-service /tmp/whist/host-setup/*.sh",
      "/tmp/whist/host-setup/setup_host.sh --deployment --binary /tmp/whist/whist-host-service ${local.pull_args}",
      "rm -rf /tmp/whist",
    ]
  }

  post-processor "manifest" {
    output     = "packer-manifest.json"
    strip_path = true
    custom_data = {
      app_env = var.app_env
      commit  = var.commit
    }
  }
}
