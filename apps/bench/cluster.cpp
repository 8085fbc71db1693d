// lockstep-bench's emulated cluster (see cluster.h, Note [The emulated cluster]).
#include "cluster.h"

#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>

#include "lockstep/errors.h"

namespace lockstep {
namespace bench {
namespace {

using detail::concat;

volatile std::sig_atomic_t g_interrupted = 0;

void on_signal(int) { g_interrupted = 1; }

// Installs on_signal for SIGINT/SIGTERM/SIGHUP while an EmulatedCluster lives (counted).
int g_live_clusters = 0;
struct sigaction g_previous[3];
constexpr int kSignals[3] = {SIGINT, SIGTERM, SIGHUP};

void hold_signals() {
  if (g_live_clusters++ > 0) return;
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &sa, &g_previous[i]);
}

void release_signals() {
  if (--g_live_clusters > 0) return;
  for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &g_previous[i], nullptr);
}

std::string ip_path() {
  for (const char* p : {"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"}) {
    if (access(p, X_OK) == 0) return p;
  }
  return "ip";
}

std::string tc_path() {
  for (const char* p : {"/usr/sbin/tc", "/sbin/tc", "/usr/bin/tc", "/bin/tc"}) {
    if (access(p, X_OK) == 0) return p;
  }
  return "tc";
}

// Runs `argv` (no shell), stdout and stderr together into `output`. Returns the exit code
// (-1 when it could not run).
int run_command(const std::vector<std::string>& argv, std::string* output) {
  int fds[2];
  if (pipe(fds) != 0) return -1;
  pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    return -1;
  }
  if (pid == 0) {
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    close(fds[0]);
    close(fds[1]);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    std::fprintf(stderr, "exec %s failed: %s\n", args[0], std::strerror(errno));
    _exit(127);
  }
  close(fds[1]);
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = read(fds[0], buf, sizeof(buf))) != 0;) {
    if (n < 0) {
      if (errno == EINTR) continue;
      break;
    }
    out.append(buf, static_cast<size_t>(n));
  }
  close(fds[0]);
  int st = 0;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  if (output) *output = out;
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

std::string join_args(const std::vector<std::string>& argv) {
  std::string s;
  for (const auto& a : argv) s += (s.empty() ? "" : " ") + a;
  return s;
}

std::string trimmed(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

// tc's rate argument: bits per second as "<n>bit".
std::string tc_rate(double bits) { return concat(static_cast<long long>(bits), "bit"); }

// tbf's bucket: 2 ms at line rate, at least 128 KiB (a GSO packet on a veth is up to 64 KiB;
// one larger than the bucket would be dropped).
std::string tbf_burst(double bits) {
  const double bytes = std::max(131072.0, bits / 8.0 * 2e-3);
  return concat(static_cast<long long>(bytes), "b");
}

}  // namespace

void parse_cluster_shape(const std::string& text, int& nodes, int& ranks_per_node) {
  int n = 0, r = 0;
  char tail = 0;
  if (std::sscanf(text.c_str(), "%dx%d%c", &n, &r, &tail) != 2 || n < 2 || n > 4 || r < 1 ||
      r > 16) {
    throw InvalidArgument(concat("--cluster: expected NODESxRANKS with 2 to 4 nodes and 1 to 16 "
                                 "ranks per node (such as 2x2), but got '",
                                 text, "'"));
  }
  nodes = n;
  ranks_per_node = r;
}

LinkSpec parse_link(const std::string& text) {
  auto bad = [&](const std::string& why) {
    throw InvalidArgument(concat("--link: expected RATE[:DELAY] such as 1gbit:0.2ms or 10gbit "
                                 "(RATE in kbit, mbit or gbit; DELAY in ms or us), but got '",
                                 text, "': ", why));
  };
  LinkSpec l;
  l.text = text;
  const auto colon = text.find(':');
  const std::string rate = text.substr(0, colon);
  char* end = nullptr;
  const double v = std::strtod(rate.c_str(), &end);
  const std::string unit = end ? std::string(end) : "";
  double scale = 0;
  if (unit == "kbit") scale = 1e3;
  if (unit == "mbit") scale = 1e6;
  if (unit == "gbit") scale = 1e9;
  if (rate.empty() || end == rate.c_str() || !std::isfinite(v) || v <= 0) bad("no rate");
  if (scale == 0) bad("unknown rate unit '" + unit + "'");
  l.rate_bits = v * scale;
  if (l.rate_bits < 1e5 || l.rate_bits > 1e11) bad("the rate must be within 100kbit..100gbit");
  if (colon != std::string::npos) {
    const std::string d = text.substr(colon + 1);
    const double dv = std::strtod(d.c_str(), &end);
    const std::string du = end ? std::string(end) : "";
    if (d.empty() || end == d.c_str() || !std::isfinite(dv) || dv < 0) bad("no delay");
    if (du == "ms") {
      l.delay_ms = dv;
    } else if (du == "us") {
      l.delay_ms = dv / 1000.0;
    } else {
      bad("unknown delay unit '" + du + "'");
    }
    if (l.delay_ms > 1000) bad("the delay must be at most 1000ms");
  }
  return l;
}

bool cluster_interrupted() { return g_interrupted != 0; }

std::vector<std::string> remove_stale_cluster_namespaces() {
  std::vector<std::string> removed;
  DIR* d = opendir("/var/run/netns");
  if (!d) return removed;
  std::vector<std::string> names;
  while (dirent* e = readdir(d)) names.push_back(e->d_name);
  closedir(d);
  const std::string prefix = kClusterPrefix;
  for (const auto& name : names) {
    if (name.rfind(prefix, 0) != 0) continue;
    char* end = nullptr;
    const long pid = std::strtol(name.c_str() + prefix.size(), &end, 10);
    if (pid <= 0 || !end || *end != '-') continue;
    if (kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // still running
    if (run_command({ip_path(), "netns", "del", name}, nullptr) == 0) removed.push_back(name);
  }
  return removed;
}

EmulatedCluster::EmulatedCluster(int nodes, const LinkSpec& link) {
  tag_ = concat(kClusterPrefix, getpid());
  hub_ = tag_ + "-hub";
  for (int i = 0; i < nodes; ++i) node_ns_.push_back(concat(tag_, "-n", i));
  hold_signals();
  const std::string ip = ip_path(), tc = tc_path();
  auto must = [&](const std::vector<std::string>& argv) {
    std::string out;
    if (run_command(argv, &out) != 0) {
      remove();
      release_signals();
      throw Error(concat("emulated cluster: `", join_args(argv), "` failed: ", trimmed(out),
                         ". It needs root (CAP_NET_ADMIN), iproute2 and the kernel's veth, "
                         "bridge and tbf support."));
    }
  };
  must({ip, "netns", "add", hub_});
  created_.push_back(hub_);
  must({ip, "-n", hub_, "link", "add", "name", "br0", "type", "bridge"});
  must({ip, "-n", hub_, "link", "set", "dev", "br0", "up"});
  const std::string rate = tc_rate(link.rate_bits), burst = tbf_burst(link.rate_bits);
  bool try_netem = link.delay_ms > 0;
  delay_applied_ = link.delay_ms == 0;
  for (int i = 0; i < nodes; ++i) {
    const std::string ns = node_ns_[i], hub_end = concat(tag_, "h", i), node_end = ifname(i);
    must({ip, "netns", "add", ns});
    created_.push_back(ns);
    must({ip, "-n", hub_, "link", "add", "name", hub_end, "type", "veth", "peer", "name", node_end,
          "netns", ns});
    must({ip, "-n", hub_, "link", "set", "dev", hub_end, "master", "br0"});
    must({ip, "-n", hub_, "link", "set", "dev", hub_end, "up"});
    must({ip, "-n", ns, "addr", "add", address(i) + "/24", "dev", node_end});
    must({ip, "-n", ns, "link", "set", "dev", node_end, "up"});
    must({ip, "-n", ns, "link", "set", "dev", "lo", "up"});
    // Toward the node: the rate only.
    must({tc, "-n", hub_, "qdisc", "add", "dev", hub_end, "root", "tbf", "rate", rate, "burst",
          burst, "latency", "50ms"});
    // From the node: the rate and the delay (netem), or the rate alone (tbf).
    bool shaped = false;
    if (try_netem) {
      std::string out;
      const std::vector<std::string> netem = {
          tc,    "-n", ns,    "qdisc", "add",  "dev", node_end, "root",  "netem", "delay",
          concat(link.delay_ms, "ms"), "rate", rate,  "limit",  "100000"};
      if (run_command(netem, &out) == 0) {
        shaped = true;
        delay_applied_ = true;
      } else {
        try_netem = false;
        note_ = concat("delay ", link.delay_ms, " ms not applied: `", join_args(netem),
                       "` failed (", trimmed(out), "); the link has its rate only (tbf)");
        std::cerr << "lockstep-bench: " << note_ << std::endl;
      }
    }
    if (!shaped) {
      must({tc, "-n", ns, "qdisc", "add", "dev", node_end, "root", "tbf", "rate", rate, "burst",
            burst, "latency", "50ms"});
    }
  }
  std::string out;
  run_command({tc, "-n", node_ns_[0], "qdisc", "show", "dev", ifname(0)}, &out);
  shaping_ = trimmed(out);
  run_command({tc, "-n", hub_, "qdisc", "show", "dev", concat(tag_, "h0")}, &out);
  shaping_ += (shaping_.empty() ? "" : "; ") + trimmed(out);
}

EmulatedCluster::~EmulatedCluster() {
  remove();
  release_signals();
}

void EmulatedCluster::remove() noexcept {
  // Deleting a namespace deletes its links, and a veth pair goes with either end.
  const std::string ip = ip_path();
  for (const auto& ns : created_) {
    std::string out;
    if (run_command({ip, "netns", "del", ns}, &out) != 0) {
      std::cerr << "lockstep-bench: could not delete network namespace " << ns << ": "
                << trimmed(out) << " (delete it with `ip netns del " << ns << "`)" << std::endl;
    }
  }
  created_.clear();
}

std::string EmulatedCluster::ifname(int i) const { return concat(tag_, "n", i); }

std::string EmulatedCluster::address(int i) const { return concat("10.77.0.", i + 1); }

std::string EmulatedCluster::netns_path(int i) const { return "/var/run/netns/" + node_ns_[i]; }

std::vector<std::string> EmulatedCluster::namespaces() const {
  std::vector<std::string> v = node_ns_;
  v.push_back(hub_);
  return v;
}

int spawn_process(const std::vector<std::string>& argv,
                  const std::vector<std::pair<std::string, std::string>>& env,
                  const std::string& log_path, const EmulatedCluster* cluster, int node) {
  const std::string ns_path = cluster ? cluster->netns_path(node) : "";
  const std::string host = cluster ? cluster->netns(node) : "";
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) throw Error("fork() failed");
  if (pid == 0) {
    for (const auto& kv : env) setenv(kv.first.c_str(), kv.second.c_str(), 1);
    int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
      close(fd);
    }
    if (cluster) {
      // Die with the coordinator (and not after it died already).
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(126);
      for (int s : kSignals) signal(s, SIG_DFL);
      int nfd = open(ns_path.c_str(), O_RDONLY | O_CLOEXEC);
      if (nfd < 0 || setns(nfd, CLONE_NEWNET) != 0 || unshare(CLONE_NEWUTS) != 0 ||
          sethostname(host.c_str(), host.size()) != 0) {
        std::fprintf(stderr, "could not enter network namespace %s as host %s: %s\n",
                     ns_path.c_str(), host.c_str(), std::strerror(errno));
        _exit(126);
      }
      close(nfd);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    std::fprintf(stderr, "exec %s failed\n", args[0]);
    _exit(127);
  }
  return pid;
}

}  // namespace bench
}  // namespace lockstep
