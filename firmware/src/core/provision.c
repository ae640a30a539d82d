#include "provision.h"

#include <stddef.h>

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "proplet.h"
#include "signature.h"

#define KEY(field, secret) {#field, offsetof(proplet_settings_t, field), sizeof(((proplet_settings_t *)0)->field), secret}

const settings_key_t settings_keys[] = {
    KEY(wifi_ssid, false), KEY(wifi_pass, true),   KEY(mqtt_url, false),
    KEY(mqtt_user, false), KEY(mqtt_pass, true),   KEY(proplet_id, false),
    KEY(domain, false),    KEY(channel, false),    KEY(trusted_keys, false),
};
const size_t settings_key_count = sizeof settings_keys / sizeof settings_keys[0];

char *settings_value(proplet_settings_t *settings, const settings_key_t *key)
{
    return key == NULL ? NULL : (char *)settings + key->offset;
}

const settings_key_t *settings_find(const char *name)
{
    for (size_t i = 0; i < settings_key_count; i++)
        if (strcmp(settings_keys[i].name, name) == 0)
            return &settings_keys[i];
    return NULL;
}

bool settings_ready(const proplet_settings_t *settings, bool needs_wifi, const char **missing)
{
    const char *required[] = {"wifi_ssid", "mqtt_url", "proplet_id", "domain", "channel"};
    for (size_t i = needs_wifi ? 0 : 1; i < sizeof required / sizeof required[0]; i++) {
        const settings_key_t *key = settings_find(required[i]);
        if (((const char *)settings + key->offset)[0] == '\0') {
            *missing = required[i];
            return false;
        }
    }
    *missing = NULL;
    return true;
}

/* mqtt://host:port (also tcp://) or mqtts:// (also ssl://): what esp-mqtt and paho accept. */
static bool valid_broker_url(const char *url)
{
    const char *schemes[] = {"mqtt://", "tcp://", "mqtts://", "ssl://"};
    for (size_t i = 0; i < sizeof schemes / sizeof schemes[0]; i++) {
        size_t n = strlen(schemes[i]);
        if (strncmp(url, schemes[i], n) == 0 && url[n] != '\0')
            return true;
    }
    return false;
}

/* Append formatted text to reply (truncating at reply_len). */
static void add(char *reply, size_t reply_len, const char *fmt, ...)
{
    size_t used = strlen(reply);
    if (used + 1 >= reply_len)
        return;
    va_list args;
    va_start(args, fmt);
    vsnprintf(reply + used, reply_len - used, fmt, args);
    va_end(args);
}

static provision_action_t handle_set_get(proplet_settings_t *settings, bool is_get,
                                         const char *name, const char *value, char *reply,
                                         size_t reply_len)
{
    const settings_key_t *key = settings_find(name);
    if (key == NULL) {
        add(reply, reply_len, "+ERR unknown key '%s'; keys:", name);
        for (size_t k = 0; k < settings_key_count; k++)
            add(reply, reply_len, " %s", settings_keys[k].name);
        add(reply, reply_len, "\n");
        return PROVISION_NONE;
    }
    char *field = settings_value(settings, key);
    if (is_get) {
        add(reply, reply_len, "+OK %s\n", key->secret && field[0] != '\0' ? "****" : field);
        return PROVISION_NONE;
    }
    const char *text = value != NULL ? value : "";
    if (strlen(text) >= key->size) {
        add(reply, reply_len, "+ERR value too long for %s (at most %zu bytes)\n", key->name,
            key->size - 1);
        return PROVISION_NONE;
    }
    if (strcmp(key->name, "mqtt_url") == 0 && text[0] != '\0' && !valid_broker_url(text)) {
        add(reply, reply_len, "+ERR mqtt_url must look like mqtt://host:port (or mqtts://), got '%s'\n",
            text);
        return PROVISION_NONE;
    }
    if (strcmp(key->name, "trusted_keys") == 0) {
        /* Checked now: a device must not find out at boot that it cannot read its keys. */
        trusted_keys_t keys;
        char why[160];
        if (!trusted_keys_parse(text, &keys, why, sizeof why)) {
            add(reply, reply_len, "+ERR trusted_keys: %s\n", why);
            return PROVISION_NONE;
        }
    }
    memcpy(field, text, strlen(text) + 1);
    add(reply, reply_len, "+OK\n");
    return PROVISION_NONE;
}

provision_action_t provision_handle_line(proplet_settings_t *settings, bool needs_wifi,
                                         const char *line, char *reply, size_t reply_len)
{
    reply[0] = '\0';
    size_t len = strlen(line);
    while (len > 0 && (line[len - 1] == '\r' || line[len - 1] == '\n'))
        len--;
    if (len >= PROVISION_LINE_MAX) {
        add(reply, reply_len, "+ERR line longer than %d bytes\n", PROVISION_LINE_MAX - 1);
        return PROVISION_NONE;
    }
    char buf[PROVISION_LINE_MAX];
    memcpy(buf, line, len);
    buf[len] = '\0';

    /* The verb is case-insensitive; the key follows after one space, the value (the rest of the
     * line, spaces included) after another. */
    char verb[16] = "";
    size_t i = 0, v = 0;
    while (i < len && buf[i] == ' ')
        i++;
    while (i < len && buf[i] != ' ' && v + 1 < sizeof verb)
        verb[v++] = (char)toupper((unsigned char)buf[i++]);
    verb[v] = '\0';
    if (i < len && buf[i] == ' ')
        i++;
    char *name = buf + i;
    char *value = strchr(name, ' ');
    if (value != NULL)
        *value++ = '\0';

    if (verb[0] == '\0')
        return PROVISION_NONE;
    if (strcmp(verb, "HELLO") == 0) {
        const char *missing;
        bool ready = settings_ready(settings, needs_wifi, &missing);
        add(reply, reply_len, "+OK propeller-proplet %s id=%s ready=%s\n", PROPLET_VERSION,
            settings->proplet_id[0] != '\0' ? settings->proplet_id : "-", ready ? "yes" : "no");
        return PROVISION_NONE;
    }
    if (strcmp(verb, "SET") == 0 || strcmp(verb, "GET") == 0)
        return handle_set_get(settings, verb[0] == 'G', name, value, reply, reply_len);
    if (strcmp(verb, "LIST") == 0) {
        for (size_t k = 0; k < settings_key_count; k++) {
            const char *field = settings_value(settings, &settings_keys[k]);
            add(reply, reply_len, "+KEY %s=%s\n", settings_keys[k].name,
                settings_keys[k].secret && field[0] != '\0' ? "****" : field);
        }
        add(reply, reply_len, "+OK %zu keys\n", settings_key_count);
        return PROVISION_NONE;
    }
    if (strcmp(verb, "SAVE") == 0)
        return PROVISION_SAVE;
    if (strcmp(verb, "ERASE") == 0) {
        memset(settings, 0, sizeof *settings);
        add(reply, reply_len, "+OK erased\n");
        return PROVISION_NONE;
    }
    if (strcmp(verb, "REBOOT") == 0) {
        add(reply, reply_len, "+OK rebooting\n");
        return PROVISION_REBOOT;
    }
    add(reply, reply_len, "+ERR unknown command '%s'; commands: HELLO SET GET LIST SAVE ERASE REBOOT\n",
        verb);
    return PROVISION_NONE;
}

void settings_parse_line(proplet_settings_t *settings, const char *line)
{
    const char *eq = strchr(line, '=');
    if (eq == NULL)
        return;
    char name[32];
    size_t n = (size_t)(eq - line);
    if (n == 0 || n >= sizeof name)
        return;
    memcpy(name, line, n);
    name[n] = '\0';
    const settings_key_t *key = settings_find(name);
    if (key == NULL)
        return;
    const char *value = eq + 1;
    size_t len = strcspn(value, "\r\n");
    if (len >= key->size)
        return;
    char *field = settings_value(settings, key);
    memcpy(field, value, len);
    field[len] = '\0';
}
