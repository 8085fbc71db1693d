#pragma once
/// \file
/// Every `LOCKSTEP_*` environment variable lockstep reads, in one place. docs/launching.md lists
/// the same table. Variables are read only at the edges (process-group initialisation, the
/// launcher, logging set-up, the DDP trace), never deep inside the library.

namespace lockstep {
namespace env {

/// Log level: trace, debug, info, warn, error, off. Default: info.
constexpr const char* kLogLevel = "LOCKSTEP_LOG_LEVEL";
/// Rendezvous timeout in seconds (store connection, all ranks joining). Default: 120.
constexpr const char* kRendezvousTimeout = "LOCKSTEP_RENDEZVOUS_TIMEOUT";
/// Collective timeout in seconds (a single all-reduce, broadcast, ...). Default: 300.
constexpr const char* kTimeout = "LOCKSTEP_TIMEOUT";
/// Job id scoping store keys, so two jobs sharing a store never mix. Default: from the
/// launcher (`TORCHELASTIC_RUN_ID`, `SLURM_JOB_ID`) or "default".
constexpr const char* kJobId = "LOCKSTEP_JOB_ID";
/// Restart round, set by lockstep-run; scopes rendezvous keys of restarted groups. Default: 0.
constexpr const char* kRestartCount = "LOCKSTEP_RESTART_COUNT";
/// Network interface Gloo binds to (like GLOO_SOCKET_IFNAME). Default: chosen from the
/// master address (loopback for a local master, the hostname's address otherwise).
constexpr const char* kSocketIfname = "LOCKSTEP_SOCKET_IFNAME";
/// Transport of the process group: gloo (TCP), shm (shared memory among the ranks of a host;
/// hierarchical, with Gloo between hosts, when the job spans several) or auto (shm when some
/// ranks share a host, else gloo). ProcessGroupOptions::transport overrides it. Default: auto.
constexpr const char* kTransport = "LOCKSTEP_TRANSPORT";
/// Path of a Chrome trace (chrome://tracing, Perfetto) written by DistributedDataParallel.
constexpr const char* kTrace = "LOCKSTEP_TRACE";
/// File where a worker writes its last uncaught error for lockstep-run's summary.
constexpr const char* kErrorFile = "LOCKSTEP_ERROR_FILE";
/// 1: a program started without any launcher's variables runs as a single process (rank 0 of
/// 1, rendezvous in-process, no listening socket). Without it such a program fails with an
/// error that says how to launch it; with a launcher's variables set it is an error. Default: 0.
constexpr const char* kStandalone = "LOCKSTEP_STANDALONE";
/// The job's store token in hex (at least 32 bytes): every store connection proves it holds
/// it (challenge-response; the token never crosses the wire). Set by lockstep-run for its
/// workers; with another launcher, give every rank the same value, never on a command line.
constexpr const char* kStoreToken = "LOCKSTEP_STORE_TOKEN";
/// Path of a file holding the store token in hex, mode 0600 or stricter (else an error);
/// an alternative to LOCKSTEP_STORE_TOKEN. Set at most one of the two.
constexpr const char* kStoreTokenFile = "LOCKSTEP_STORE_TOKEN_FILE";
/// Set by lockstep-run for every worker: 1 when the worker's stdout reaches a terminal (the
/// launcher's own stdout is one and the rank's stdout is not redirected to a file only), else
/// 0. A worker's stdout is a pipe to the launcher, so isatty() cannot tell; train::Progress
/// draws its bar by this instead. Other launchers leave it unset (then isatty() decides).
constexpr const char* kStdoutTty = "LOCKSTEP_STDOUT_TTY";
/// Set to 1 by lockstep-run when it hosts the rendezvous store on MASTER_PORT.
constexpr const char* kAgentStore = "LOCKSTEP_AGENT_STORE";

}  // namespace env
}  // namespace lockstep
