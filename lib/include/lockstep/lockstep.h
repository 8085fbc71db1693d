#pragma once
/// \file
/// Umbrella header: everything a training program needs from lockstep.

#include "lockstep/agreement.h"
#include "lockstep/comm_hooks.h"
#include "lockstep/data_parallel.h"
#include "lockstep/ddp.h"
#include "lockstep/env_vars.h"
#include "lockstep/errors.h"
#include "lockstep/grad_scaler.h"
#include "lockstep/launch_env.h"
#include "lockstep/log.h"
#include "lockstep/main.h"
#include "lockstep/options.h"
#include "lockstep/process_group.h"
#include "lockstep/readers.h"
#include "lockstep/sampler.h"
#include "lockstep/store.h"
#include "lockstep/sync_batch_norm.h"
#include "lockstep/thread_group.h"
#include "lockstep/zero_redundancy_optimizer.h"
