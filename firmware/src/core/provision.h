/* Provisioning over the serial port: a line protocol that writes the proplet's settings
 * (Wi-Fi, broker, identity) without editing source (upstream defect 53).
 *
 * One command per line; every answer line starts with "+" so a reader can skip the log lines
 * the device prints on the same port:
 *
 *   HELLO                  -> +OK propeller-proplet <version> id=<id or -> ready=<yes|no>
 *   SET <key> <value...>   -> +OK | +ERR <why>      (the value is the rest of the line)
 *   SET trusted_keys <k>[,<k>...]                    (Ed25519 public keys; see proplet_settings_t)
 *   GET <key>              -> +OK <value>           (secrets read back as ****)
 *   LIST                   -> +KEY <key>=<value> ... then +OK <n> keys
 *   SAVE                   -> +OK saved | +ERR <why>  (to NVS on the device, a file on the host)
 *   ERASE                  -> +OK erased            (clears the values; SAVE to persist)
 *   REBOOT                 -> +OK rebooting         (restart with the saved settings)
 *
 * Lines are at most PROVISION_LINE_MAX bytes; longer ones are answered with +ERR and ignored.
 */
#ifndef PROPLET_PROVISION_H
#define PROPLET_PROVISION_H

#include <stdbool.h>
#include <stddef.h>

#include "limits.h"

/* Long enough for "SET trusted_keys " and PROPLET_TRUSTED_KEYS_MAX keys in their PEM-body form. */
#define PROVISION_LINE_MAX 320

typedef struct {
    char wifi_ssid[33];
    char wifi_pass[65];
    char mqtt_url[129];
    char mqtt_user[65];
    char mqtt_pass[129];
    char proplet_id[65];
    char domain[65];
    char channel[65];
    /* Ed25519 public keys whose signatures this proplet requires (signature.h): each the base64 of
     * its 32 bytes or the body line of its PEM file, separated by commas. Empty: nothing checked. */
    char trusted_keys[PROPLET_TRUSTED_KEYS_MAX * 62];
} proplet_settings_t;

typedef enum { PROVISION_NONE, PROVISION_SAVE, PROVISION_REBOOT } provision_action_t;

typedef struct {
    const char *name;
    size_t offset;
    size_t size;
    bool secret;
} settings_key_t;

extern const settings_key_t settings_keys[];
extern const size_t settings_key_count;

/* The value of a key inside settings (NULL for an unknown key). */
char *settings_value(proplet_settings_t *settings, const settings_key_t *key);
const settings_key_t *settings_find(const char *name);

/* Whether the settings are enough to join the network; the first missing key in *missing.
 * Wi-Fi keys are required only on ports that use Wi-Fi. */
bool settings_ready(const proplet_settings_t *settings, bool needs_wifi, const char **missing);

/* Handle one line (without its newline). The answer (one or more lines, each ending in "\n")
 * goes into reply. SAVE and REBOOT are carried out by the caller, which then appends its own
 * "+OK saved" / "+ERR ..." for SAVE. */
provision_action_t provision_handle_line(proplet_settings_t *settings, bool needs_wifi,
                                         const char *line, char *reply, size_t reply_len);

/* Parse "key=value" lines (the host's settings file, and LIST output) into settings. */
void settings_parse_line(proplet_settings_t *settings, const char *line);

#endif
